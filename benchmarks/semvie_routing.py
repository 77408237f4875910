"""SemVIE routing cost, side by side in one run:

    python benchmarks/semvie_routing.py [--hidden 768] [--layers 8] [--text 64] [--image 256]

On one text-to-image sequence ([prompt] <image start> [codes]) through a moderately sized
random Qwen2 (hidden 768, 8 layers, FFN 2048, 16,384 text ids, 8,192 visual codes):
- routed: SemVIE as shipped, each token gathered to its own expert once (routing="gather");
- masked: the same weights, both experts on every token, then a select (routing="mask");
- plain: the wrapped Hugging Face model alone on the same sequence (visual ids folded into
  its text vocabulary), i.e. what the sequence costs without any expert.
Targets: masked / routed >= 1.6 and routed / plain <= 1.2. Variants run interleaved, round
by round, and each figure is the median over rounds, so load from other jobs on a shared
machine hits them alike; forward passes without gradients, then training steps (forward +
backward; SemVIE with its frozen text expert, the plain model fully trainable).

One torch thread by default: on a machine whose cores other jobs also use, a parallel
elementwise op waits for a descheduled worker thread (measured: a 0.8 MB add took 14 ms with
2 threads at load 6, 0.15 ms with 1), which times the machine's load, not the model;
``--threads 2`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mars_semvie import SemVIEForCausalLM


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--text-vocab", type=int, default=16384)
    parser.add_argument("--codes", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=64, help="prompt tokens")
    parser.add_argument("--image", type=int, default=256, help="image codes (16x16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.text_vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
    )
    plain = AutoModelForCausalLM.from_config(config)
    semvie = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_config(config), args.codes)
    semvie.llm.load_state_dict(plain.state_dict())
    vocab = semvie.vocab
    text = torch.randint(0, args.text_vocab, (args.batch, args.text))
    codes = vocab.codes_to_ids(torch.randint(0, args.codes, (args.batch, args.image)))
    ids = torch.cat([text, torch.full((args.batch, 1), vocab.image_start), codes], dim=1)
    plain_ids = ids % args.text_vocab
    labels = ids.clone()
    labels[:, : args.text + 1] = -100

    def semvie_forward(routing: str):
        semvie.config.routing = routing
        return semvie(ids, labels=labels)

    def train_step(fn):
        fn().loss.backward()

    variants = {
        "routed": lambda: semvie_forward("gather"),
        "masked": lambda: semvie_forward("mask"),
        "plain": lambda: plain(input_ids=plain_ids, labels=labels % args.text_vocab * (labels >= 0) - 100 * (labels < 0)),
    }
    params = sum(p.numel() for p in plain.parameters())
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, FFN {args.intermediate}, {args.text_vocab} text ids "
          f"({params / 1e6:.0f}M parameters); SemVIE vocab {vocab.size}; sequence {args.text} text + 1 + "
          f"{args.image} codes, batch {args.batch}; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    for mode, rounds in (("forward (no grad)", args.rounds), ("train step (fwd + bwd)", args.train_rounds)):
        times = {name: [] for name in variants}
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in variants.items():
                if mode.startswith("forward"):
                    with torch.no_grad():
                        seconds = timed(fn)
                else:
                    seconds = timed(lambda: train_step(fn))
                    semvie.zero_grad(set_to_none=True)
                    plain.zero_grad(set_to_none=True)
                if r:
                    times[name].append(seconds)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"\n{mode}, median of {rounds} rounds:")
        for name, seconds in median.items():
            print(f"  {name:<7} {seconds * 1e3:9.1f} ms")
        print(f"  masked / routed = {median['masked'] / median['routed']:.2f}x   (target >= 1.6)")
        print(f"  routed / plain  = {median['routed'] / median['plain']:.2f}x   (target <= 1.2)")


if __name__ == "__main__":
    main()
