"""Does a frozen text LLM know which object goes where? A linear probe of its hidden states.

    python -m mars_app.binding_probe --llm <lm run>/llm [--num 3000] [--steps 300]

MARS's visual expert reads the frozen LLM only through its keys and values, so whatever the
image needs must already be linearly available in the LLM's hidden states. For two-object
captions of the shapes world this probe takes the hidden state of every layer at the
``<|endoftext|>`` that closes the prompt (the last text position before ``<image_start>``,
``mars_semvie.sequences``) and fits a linear classifier for the object that comes FIRST in
the image's reading order (left object of a horizontal relation, top object of a vertical
one: 18 colour x shape classes). Held-out accuracy per layer and language tells whether the
binding is computed by the text LLM (near 1) or left to the visual expert (near chance for
a model that only stores the words: about 0.5 once the two named objects are known).
"""

from __future__ import annotations

import argparse
import random

import torch

from mars_data.shapes import restatement, sample_record
from mars_semvie.sequences import encode_prompt


@torch.no_grad()
def features(llm, tokenizer, records: list[dict], batch_size: int = 250) -> torch.Tensor:
    """(layers + 1, N, hidden): every layer's state at the prompt's closing eot."""
    out = []
    for start in range(0, len(records), batch_size):
        rows = [encode_prompt(tokenizer, r["prompt"]) for r in records[start : start + batch_size]]
        length = max(map(len, rows))
        ids = torch.tensor([[row[0]] * (length - len(row)) + row for row in rows])  # left-pad
        mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = llm(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, -1] for h in hidden]))
    return torch.cat(out, dim=1)


def probe(x_train, y_train, x_test, y_test, classes: int, steps: int) -> float:
    """Held-out accuracy of a linear softmax classifier on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    return float((linear(x_test).argmax(-1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m mars_app.binding_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--llm", required=True, help="Hugging Face LM directory (model + tokenizer)")
    parser.add_argument("--num", type=int, default=3000, help="two-object captions (80%% train, 20%% test)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7001)
    args = parser.parse_args(argv)

    llm = AutoModelForCausalLM.from_pretrained(args.llm).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    rng = random.Random(f"mars-binding-probe/{args.seed}")
    records = [sample_record(rng, num_objects=2) for _ in range(args.num)]
    labels = sorted({restatement({"objects": [o]}) for r in records for o in r["scene"]["objects"]})
    y = torch.tensor([labels.index(" ".join(restatement(r["scene"]).split()[:2])) for r in records])
    langs = [r["lang"] for r in records]
    x = features(llm, tokenizer, records)
    split = int(0.8 * len(records))
    print(f"{args.llm}: first object in reading order ({len(labels)} classes), held-out accuracy")
    for layer in range(x.shape[0]):
        accuracy = probe(x[layer, :split], y[:split], x[layer, split:], y[split:], len(labels), args.steps)
        per_lang = {}
        for lang in ("en", "zh"):
            test = [i for i in range(split, len(records)) if langs[i] == lang]
            keep = [i for i in range(split) if langs[i] == lang]
            per_lang[lang] = probe(x[layer, keep], y[keep], x[layer, test], y[test], len(labels), args.steps)
        print(f"  layer {layer}: all {accuracy:.3f}  en {per_lang['en']:.3f}  zh {per_lang['zh']:.3f}")


if __name__ == "__main__":
    main()
