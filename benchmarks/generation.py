"""Image generation speed, side by side in one run:

    python benchmarks/generation.py [--batch 4] [--grid 16] [--rounds 2] [--threads 1]

On a moderately sized random SemVIE (Qwen2 hidden 256, 4 layers, FFN 768, 1,024 text ids,
8,192 visual codes: 3.9M text + 7.6M visual parameters), a batch of text prompts of
different lengths (left-padded) each draws a 16x16 grid = 256 image tokens, restricted to
visual codes, with mars_semvie.sampling:
- KV cache vs recomputing the whole sequence at every step (greedy, no guidance): the
  outputs must be identical (asserted); target >= 10x image tokens/s.
- Classifier-free guidance with conditional and unconditional rows in one batch of 2B vs two
  passes of B rows per step (two caches, the same guided logits; outputs asserted
  identical); target >= 1.3x.
Variants run interleaved, round by round, and each figure is the median over rounds, so
load from other jobs on a shared machine hits them alike.

One torch thread by default: on a machine whose cores other jobs also use, a parallel op
waits for descheduled worker threads, which times the machine's load, not the method
(benchmarks/semvie_routing.py measured it); ``--threads 2`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mars_semvie import SemVIEForCausalLM
from mars_semvie.sampling import Decoder, generate, guide, sample_next
from mars_semvie.sequences import collate, image_slots


def two_pass_guided(model, cond, uncond, slots, cfg_scale) -> torch.Tensor:
    """Guided greedy decoding with the conditional and unconditional rows in separate passes."""
    steps = len(slots)
    decoders = [Decoder(model, b["input_ids"], b["attention_mask"], steps) for b in (cond, uncond)]
    tokens = []
    for step, slot in enumerate(slots):
        if slot is None:
            logits = guide(torch.cat([d.logits for d in decoders]), cfg_scale)
            token = sample_next(logits, allowed_ids=model.vocab.code_ids)
        else:
            token = torch.full((len(cond["input_ids"]),), slot)
        tokens.append(token)
        if step + 1 < steps:
            for decoder in decoders:
                decoder.append(token)
    return torch.stack(tokens, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-vocab", type=int, default=1024)
    parser.add_argument("--codes", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="prompts per batch")
    parser.add_argument("--grid", type=int, default=16, help="image side in codes (16: 256 tokens)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.text_vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        initializer_range=0.1,  # peaked random logits: greedy choices are not decided by rounding
    )
    model = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_config(config), args.codes).eval()
    groups = model.parameter_groups()
    text_params = sum(n for part, (n, _) in groups.items() if part.startswith(("text", "layer")))
    visual_params = sum(n for part, (n, _) in groups.items() if not part.startswith(("text", "layer")))
    vocab = model.vocab

    lengths = [12 + 5 * i for i in range(args.batch)]  # prompts of different lengths
    prompts = [[*torch.randint(0, args.text_vocab, (n,)).tolist(), vocab.image_start] for n in lengths]
    cond = collate(prompts, vocab)
    uncond = collate([[0, 0, vocab.image_start]] * args.batch, vocab)
    slots = image_slots(args.grid, args.grid, vocab)  # grid codes, then <image_end> placed
    image_tokens = args.batch * args.grid * args.grid
    common = dict(allowed_ids=vocab.code_ids, forced=slots)
    guided = dict(uncond_ids=uncond["input_ids"], uncond_attention_mask=uncond["attention_mask"], cfg_scale=args.cfg_scale)

    variants = {
        "kv cache": lambda: generate(model, cond["input_ids"], len(slots), cond["attention_mask"], kv_cache=True, **common),
        "recompute": lambda: generate(model, cond["input_ids"], len(slots), cond["attention_mask"], kv_cache=False, **common),
        "cfg one batch": lambda: generate(model, cond["input_ids"], len(slots), cond["attention_mask"], **guided, **common),
        "cfg two passes": lambda: two_pass_guided(model, cond, uncond, slots, args.cfg_scale),
    }
    times = {name: [] for name in variants}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - start)
    assert torch.equal(outputs["kv cache"], outputs["recompute"]), "KV cache changed the greedy output"
    assert torch.equal(outputs["cfg one batch"], outputs["cfg two passes"]), "one-batch CFG changed the output"
    assert len(set(outputs["kv cache"].flatten().tolist())) > 1, "constant output: the comparison would prove nothing"

    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"SemVIE: {text_params / 1e6:.1f}M text + {visual_params / 1e6:.1f}M visual parameters; batch {args.batch} "
        f"prompts of {min(lengths)}-{max(lengths)} text tokens, {args.grid}x{args.grid} = {args.grid**2} image tokens "
        f"each; {args.threads} torch thread(s), {os.cpu_count()} cores (shared machine: load average "
        f"{os.getloadavg()[0]:.1f}); median of {args.rounds} rounds"
    )
    for name, seconds in median.items():
        print(f"  {name:<15} {seconds:8.2f} s  {image_tokens / seconds:9.1f} image tokens/s")
    print(f"KV cache vs recompute:      {median['recompute'] / median['kv cache']:.1f}x  (identical greedy output; target >= 10x)")
    print(f"CFG one batch vs two passes: {median['cfg two passes'] / median['cfg one batch']:.2f}x  (identical output; target >= 1.3x)")


if __name__ == "__main__":
    main()
