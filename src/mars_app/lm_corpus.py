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
(mars_semvie.sequences), so nothing is added to what the user types. The prompt format
(resolution, then caption) is ``mars_semvie.sequences.prompt_text``: the corpus is written here,
beside the training code, so the two cannot drift apart.

``--resolutions 64x64,96x64`` writes a resolution before a share of the captions (stage II
prompts, ``mars_semvie.sequences.prompt_text``) so that the LM has seen them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from mars_core.io import write_text_atomic
from mars_data.shapes import restatement, sample_record
from mars_semvie.sequences import prompt_text
from mars_semvie.text import ENDOFTEXT

def corpus_text(record: dict, resolution: tuple[int, int] | None = None) -> str:
    """One pretraining text: the caption (with its resolution), end of text, the restatement."""
    return f"{prompt_text(record['prompt'], resolution)}{ENDOFTEXT}{restatement(record['scene'])}"


def write_corpus(out: str | Path, num: int, seed: int, resolutions: list[tuple[int, int]] = (), resolution_share: float = 0.5) -> None:
    rng = random.Random(f"mars-lm-corpus/{seed}")
    rows = []
    for i in range(num):
        record = sample_record(rng, langs=(("en", "zh")[(i // 2) % 2],), num_objects=1 + i % 2)
        resolution = rng.choice(resolutions) if resolutions and rng.random() < resolution_share else None
        rows.append({"prompt": corpus_text(record, resolution)})
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mars_app.lm_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolutions", default="", help="comma-separated WxH written after some captions")
    args = parser.parse_args(argv)
    resolutions = [tuple(int(v) for v in r.split("x")) for r in args.resolutions.split(",") if r]
    write_corpus(args.out, args.num, args.seed, resolutions)
    print(f"wrote {args.num} texts to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
