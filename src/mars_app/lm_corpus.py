"""The text LLM's pretraining corpus for the shapes world: captions with a layout restatement.

    python -m mars_app.lm_corpus --num 50000 --seed 6001 --out data/lm_corpus/train.jsonl

Each row's ``prompt`` is a caption of the world (both languages, every grammar form), then
``<|endoftext|>``, then the scene's layout restatement in the image's reading order
(``mars_data.shapes.restatement``: "a yellow circle right of one blue square" -> "blue square
left of yellow circle").

Why. MARS keeps the text LLM frozen, so the visual expert can only read what the LLM's hidden
states already hold. An LM trained on captions alone never has to work out which object is
where: its states carry the words and their order, and in "A right of B" or "A在B的左边" (the
relation comes last in Chinese) the visual queries would have to do the binding themselves
through frozen keys and values. Trained to continue a caption with its restatement, the LM
must compute the layout, and its state at the ``<|endoftext|>`` that closes the caption must
predict the first object in reading order: exactly the binding the image needs. At
text-to-image time the prompt is still the plain caption framed by ``<|endoftext|>``
(mars_semvie.sequences), so nothing is added to what the user types. Stage II writes its
resolution after the caption and the plan, where no state of the caption depends on it, so the
corpus holds no resolutions and one LM serves both stages.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from mars_core.io import write_text_atomic
from mars_data.shapes import restatement, sample_record
from mars_semvie.vocab import ENDOFTEXT

def corpus_text(record: dict) -> str:
    """One pretraining text: the caption, end of text, the restatement."""
    return f"{record['prompt'].strip()}{ENDOFTEXT}{restatement(record['scene'])}"


def write_corpus(out: str | Path, num: int, seed: int) -> None:
    rng = random.Random(f"mars-lm-corpus/{seed}")
    rows = []
    for i in range(num):
        record = sample_record(rng, langs=(("en", "zh")[(i // 2) % 2],), num_objects=1 + i % 2)
        rows.append({"prompt": corpus_text(record)})
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mars_app.lm_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_corpus(args.out, args.num, args.seed)
    print(f"wrote {args.num} texts to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
