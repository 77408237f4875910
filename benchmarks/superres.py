"""Super-resolution decoding, K=1 vs K=2/4/8, fast and exact, side by side in one run:

    python benchmarks/superres.py [--grid 16] [--batch 4] [--rounds 2] [--threads 1]
    python benchmarks/superres.py --base <stage I/II run>/mars --superres <stage III run>/superres [--num 200]

Per variant: forward passes, high-res tokens per second, wall-clock ratio to K=1, mean
accepted length (exact), and whether greedy output equals K=1's (exact: asserted). Variants
run interleaved, round by round; each time is the median over rounds, so load from other
jobs hits them alike. Greedy, guidance 1.5.

Without checkpoints: a random SuperResModel (Qwen2 hidden 256, 4 layers, 8,192 codes, K_max 8,
random heads) upscales random low-res grids (grid/2 -> grid codes, row ends): speed only, and
random heads rarely draft what head 1 would draw, so exact mode gains little there.

With ``--base`` and ``--superres`` (the shapes world): held-out prompts (``--seed``, no
training job uses it) are drawn at 64 px by the base model once, then upscaled by each variant
and scored at 128 px by the shapes evaluator (single / pair / spatial per language, the base
images' scores beside them); and ground-truth 64 px renders are upscaled by each variant, by
nearest-neighbour and by bicubic resizing: the share of pixels whose palette colour equals
the exact 128 px render's (``mars_data.shapes.scoring.classify_pixels``). Beside them: the best
any upscaler of those renders can do (``shapes.ideal_upscale``), the tokenizer's round trip of
the exact 128 px renders (the ceiling of any model that writes codes) and its round trip of the
64 px renders as the model reads them, nearest-upscaled (what the codes the model reads hold).
Each variant's palette match is also given as its lead over nearest-neighbour on the same
renders, with two standard errors (paired over scenes: at 200 renders the leads are a few
ten-thousandths, about the size of their error). Speed in batches (``--batch-size``) and, in
``--latency-rounds`` rounds of their own, for the first ``--latency-num`` base images one image
at a time: the interactive case, where a pass over K tokens costs about what a pass over one
does, so fewer passes are fewer seconds; in large batches on a CPU a pass is compute-bound and
costs nearly K passes of one.

One torch thread by default (see benchmarks/generation.py); ``--threads 2`` on a quiet machine;
``--device cuda`` on a GPU (decoding synchronizes before each time is taken).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForCausalLM, Qwen2Config

from mars_semvie import SemVIEForCausalLM
from mars_semvie.sequences import collate, image_slots
from mars_superres import DecodeStats, SuperResConfig, SuperResModel, decode

VARIANTS = [(1, "exact"), (2, "fast"), (4, "fast"), (8, "fast"), (2, "exact"), (4, "exact"), (8, "exact")]


def random_model(args) -> SuperResModel:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, initializer_range=0.1,
        max_position_embeddings=4096,
    )
    semvie = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_config(config), args.codes)
    model = SuperResModel(semvie, SuperResConfig(tokens_per_step=8, long_side=16 * args.grid)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.extra_heads.down.normal_(0, 0.02, generator=g)
    return model.to(args.device)


def random_prompts(model: SuperResModel, args):
    g = torch.Generator().manual_seed(0)
    cond, uncond = [], []
    for row in range(args.batch):
        low = torch.randint(0, model.vocab.num_codes, (args.grid // 2, args.grid // 2), generator=g)
        text = torch.randint(0, model.vocab.text_size, (8 + 3 * row,), generator=g).tolist()
        cond.append(model.prompt_ids(text, low))
        uncond.append(model.prompt_ids(text[:2], low))
    return tuple({k: v.to(args.device) for k, v in collate(rows, model.vocab).items()} for rows in (cond, uncond))


def speed(model, args) -> None:
    cond, uncond = random_prompts(model, args)
    slots = image_slots(args.grid, args.grid, model.vocab, row_end=True)
    times = {v: [] for v in VARIANTS}
    results = {}
    for _ in range(args.rounds):
        for K, mode in VARIANTS:
            start = time.perf_counter()
            results[K, mode] = decode(
                model, cond["input_ids"], slots, cond["attention_mask"], tokens_per_step=K, mode=mode,
                uncond_ids=uncond["input_ids"], uncond_attention_mask=uncond["attention_mask"], cfg_scale=1.5,
            )
            times[K, mode].append(time.perf_counter() - start)
    reference = results[1, "exact"][0]
    base_time = statistics.median(times[1, "exact"])
    tokens = args.batch * len(slots)
    print(f"{args.batch} images x {len(slots)} high-res tokens ({args.grid}x{args.grid} codes + row ends), median of {args.rounds} rounds")
    print("| K | mode | forward passes | fewer passes | tokens/s | wall-clock ratio | mean accepted length | = K=1 greedy |")
    print("|---|---|---|---|---|---|---|---|")
    for K, mode in VARIANTS:
        out, stats = results[K, mode]
        same = torch.equal(out, reference)
        if mode == "exact":
            assert same, f"exact K={K} differs from K=1"
        t = statistics.median(times[K, mode])
        passes = results[1, "exact"][1].forward_passes / stats.forward_passes
        print(
            f"| {K} | {mode} | {stats.forward_passes} | {passes:.2f}x | {tokens / t:.0f} | {base_time / t:.2f}x | "
            f"{stats.mean_accepted_length:.2f} | {'yes' if same else 'no'} |"
        )


def trained(args) -> None:
    from mars_app.cascade import Cascade
    from mars_app.pipeline import from_pil, to_pil
    from mars_data import shapes
    from mars_data.shapes.scoring import classify_pixels

    cascade = Cascade.from_pretrained(args.base, args.superres, device=args.device)
    if args.prompts_file:
        records = shapes.write_prompts(args.prompts_file, args.num, args.seed)
    else:
        records = shapes.heldout_records(args.num, args.seed)
    prompts = [r["prompt"] for r in records]
    base = cascade.base.generate(prompts, cfg_scale=1.5, batch_size=args.batch_size, progress=True)
    low_size = base[0].size
    renders_low = [shapes.render(r["scene"], *low_size) for r in records]
    variants = [(K, m) for K, m in VARIANTS if K <= cascade.superres.model.num_heads]
    times = {v: [] for v in variants}
    decode_times = {v: [] for v in variants}
    outputs = {}
    for _ in range(args.rounds):
        for K, mode in variants:
            start = time.perf_counter()
            outputs[K, mode] = cascade.superres.upscale(base, prompts, K, mode, cfg_scale=1.5, batch_size=args.batch_size)
            times[K, mode].append(time.perf_counter() - start)
            decode_times[K, mode].append(outputs[K, mode][1].seconds)
            outputs[K, mode, "renders"] = cascade.superres.upscale(renders_low, prompts, K, mode, cfg_scale=1.5, batch_size=args.batch_size)
    # the interactive case: one image (two guidance rows) per forward pass, in rounds of its own
    # (one round interleaved with the batch runs was noisy: docs/LOG.md, session 25); within a
    # round every image goes through every variant in turn, so a change of load hits all alike
    latency = {v: [] for v in variants}  # per round: (decoding, upscale) seconds over the images
    alone = {}
    first = list(zip(base, prompts))[: args.latency_num]
    for _ in range(args.latency_rounds if first else 0):
        total = {v: [0.0, 0.0] for v in variants}
        for image, prompt in first:
            for K, mode in variants:
                start = time.perf_counter()
                _, stats = cascade.superres.upscale([image], [prompt], K, mode, cfg_scale=1.5, batch_size=1)
                total[K, mode][1] += time.perf_counter() - start
                total[K, mode][0] += stats.seconds
                alone.setdefault((K, mode), []).append(stats)
        for v in variants:
            latency[v].append(total[v])
    high_size = outputs[variants[0]][0][0].size
    renders_high = [classify_pixels(np.asarray(shapes.render(r["scene"], *high_size))) for r in records]

    def matches(images) -> np.ndarray:
        """Per image: the share of pixels whose palette colour equals the exact render's."""
        return np.array([(classify_pixels(np.asarray(im.convert("RGB"))) == gt).mean() for im, gt in zip(images, renders_high)])

    def palette_match(images) -> float:
        return float(matches(images).mean())

    def scores(images) -> str:
        summary = shapes.summarize([shapes.score_image(im, r) for im, r in zip(images, records)])
        return " ".join(f"{lang} {s['single_binding']:.2f}/{s['pair_binding']:.2f}/{s['spatial']:.2f}" for lang, s in sorted(summary.items()) if lang in ("en", "zh"))

    print(f"{len(records)} held-out prompts (seed {args.seed}); base images {low_size}, high-res {high_size}")
    print(f"base images ({low_size[0]}x{low_size[1]}), single/pair/spatial: {scores(base)}")
    nearest = matches([im.resize(high_size, Image.NEAREST) for im in renders_low])
    print(f"palette match from {low_size[0]}x{low_size[1]} renders, nearest: {nearest.mean():.4f}")
    print(f"palette match from {low_size[0]}x{low_size[1]} renders, bicubic: {palette_match([im.resize(high_size, Image.BICUBIC) for im in renders_low]):.4f}")
    ideal = [shapes.ideal_upscale(r["scene"], low_size, high_size) for r in tqdm(records, desc="ideal upscaling", unit="scene")]
    print(f"palette match from {low_size[0]}x{low_size[1]} renders, the best any upscaler can do (shapes.ideal_upscale): {palette_match(ideal):.4f}")
    # the ceiling of any super-resolution through this tokenizer: the exact high-res render, encoded and decoded
    vq = cascade.superres.vq_tokenizer
    with torch.no_grad():
        round_trip = to_pil(vq.decode(vq.encode(from_pil([shapes.render(r["scene"], *high_size) for r in records]))))
        low_trip = to_pil(vq.decode(cascade.superres.encode(renders_low)))
    print(f"palette match of the tokenizer's round trip of the exact {high_size[0]}x{high_size[1]} renders (the ceiling): {palette_match(round_trip):.4f}")
    # what the model is given: the low-res codes (at its lowres_scale), decoded and resized, with no model between
    print(f"palette match of the tokenizer's round trip of the {low_size[0]}x{low_size[1]} renders as the model reads them, nearest: "
          f"{palette_match([im.resize(high_size, Image.NEAREST) for im in low_trip]):.4f}")
    base_time, base_decode = statistics.median(times[1, "exact"]), statistics.median(decode_times[1, "exact"])
    one = outputs[1, "exact"]
    print(f"batches of {args.batch_size} images, median of {args.rounds} rounds; decoding: the high-res tokens alone; "
          "upscale: with the prompts and the VQ encoding and decoding")

    def against_nearest(images) -> str:
        """The palette match's lead over nearest-neighbour on the same renders, mean over images
        and two standard errors of it (paired: the same scenes)."""
        lead = matches(images) - nearest
        spread = 2 * lead.std(ddof=1) / np.sqrt(len(lead)) if len(lead) > 1 else float("nan")
        return f"{lead.mean():+.4f} ± {spread:.4f}"

    print("| K | mode | forward passes | tokens/s decoding | wall-clock ratio, decoding / upscale "
          "| mean accepted length (base images / renders) | single/pair/spatial | palette match | lead over nearest (± 2 SE) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for K, mode in variants:
        images, stats = outputs[K, mode]
        t, d = statistics.median(times[K, mode]), statistics.median(decode_times[K, mode])
        if mode == "exact":
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, one[0])), f"exact K={K} differs from K=1"
        renders = outputs[K, mode, "renders"]
        print(
            f"| {K} | {mode} | {stats.forward_passes} ({one[1].forward_passes / stats.forward_passes:.2f}x fewer) | "
            f"{stats.tokens / d:.0f} | {base_decode / d:.2f}x / {base_time / t:.2f}x | {stats.mean_accepted_length:.2f} / "
            f"{renders[1].mean_accepted_length:.2f} | {scores(images)} | {palette_match(renders[0]):.4f} | {against_nearest(renders[0])} |"
        )
    if not first:
        return
    print(f"one image at a time: the first {len(first)} base images, upscaled in batches of 1, median of {args.latency_rounds} rounds")
    print("| K | mode | forward passes per image | seconds per image, decoding | wall-clock ratio, decoding / upscale | mean accepted length |")
    print("|---|---|---|---|---|---|")
    d1, t1 = (statistics.median(r[i] for r in latency[1, "exact"]) for i in (0, 1))
    for K, mode in variants:
        d, t = (statistics.median(r[i] for r in latency[K, mode]) for i in (0, 1))
        runs = alone[K, mode]
        accepted = DecodeStats(accepted=[a for run in runs for a in run.accepted]).mean_accepted_length
        print(f"| {K} | {mode} | {sum(run.forward_passes for run in runs) / len(runs):.1f} | {d / len(first):.3f} | "
              f"{d1 / d:.2f}x / {t1 / t:.2f}x | {accepted:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="a MARS checkpoint directory (the base model)")
    parser.add_argument("--superres", help="a super-resolution checkpoint directory (SuperResModule.export)")
    parser.add_argument("--num", type=int, default=200, help="held-out prompts (trained models)")
    parser.add_argument("--seed", type=int, default=4242, help="held-out prompt seed (no training job uses it)")
    parser.add_argument("--prompts-file", help="also write the held-out prompts to this JSON Lines file")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency-num", type=int, default=8, help="also time the first N base images one at a time (trained models; 0: no)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--codes", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="images per batch (random model)")
    parser.add_argument("--grid", type=int, default=16, help="high-res side in codes (random model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-rounds", type=int, default=3, help="rounds of the one-image timing (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if (args.base is None) != (args.superres is None):
        parser.error("--base and --superres go together")
    with torch.no_grad():
        trained(args) if args.base else speed(random_model(args), args)


if __name__ == "__main__":
    main()
