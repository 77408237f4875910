"""The optimizer's own step in the shapes recipes, torch's for-each kernels vs fused, side by side:

    python benchmarks/optimizer_step.py [--rounds 40] [--threads 2]

The recipes train tiny models on a CPU, where Adam(W)'s step over a few hundred small tensors
is a visible share of a training step (a stage I profile: 8.5%). On the parameters each
recipe trains, with random gradients: the shapes tokenizer (Adam, all of its 0.7M
parameters), the text LLM (AdamW, all of it) and MARS stage I (AdamW, SemVIE's visual
experts, embeddings and vision head around that LLM; stage III trains the same set plus its
heads). Each variant steps once per round, interleaved, and the figure is the median over
rounds, so load from other jobs hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mars_semvie import SemVIEForCausalLM
from mars_tokenizer.vqgan import PRESETS, VQGAN

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def recipes() -> dict[str, tuple[type, list[torch.nn.Parameter]]]:
    torch.manual_seed(0)
    llm_config = instantiate(OmegaConf.load(CONF / "shapes_lm.yaml").config)
    tokenizer = VQGAN(PRESETS["shapes"]).to(memory_format=torch.channels_last)  # as VQGANModule trains it
    llm = AutoModelForCausalLM.from_config(llm_config)
    semvie = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_config(llm_config), num_visual_codes=512)
    return {
        "tokenizer (Adam)": (torch.optim.Adam, list(tokenizer.parameters())),
        "text LLM (AdamW)": (torch.optim.AdamW, list(llm.parameters())),
        "stage I (AdamW)": (torch.optim.AdamW, [p for p in semvie.parameters() if p.requires_grad]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} steps")
    for name, (cls, params) in recipes().items():
        for p in params:
            p.grad = torch.randn_like(p)
        variants = {"foreach": cls(params, lr=1e-4, foreach=True), "fused": cls(params, lr=1e-4, fused=True)}
        times = {v: [] for v in variants}
        for r in range(args.rounds + 1):  # round 0 warms up (state allocation)
            for v, optimizer in variants.items():
                start = time.perf_counter()
                optimizer.step()
                if r:
                    times[v].append(time.perf_counter() - start)
        median = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        print(f"{name:<18} {len(params):4d} tensors, {sum(p.numel() for p in params) / 1e6:.2f}M: foreach "
              f"{median['foreach']:6.2f} ms, fused {median['fused']:6.2f} ms, foreach / fused = "
              f"{median['foreach'] / median['fused']:.2f}x")


if __name__ == "__main__":
    main()
