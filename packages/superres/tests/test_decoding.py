"""Decoding with K heads: exact greedy == K=1 greedy, exact sampling == head-1 sampling, fast passes."""

from __future__ import annotations

import math

import pytest
import torch

from mars_semvie import sequences as seq
from mars_semvie.sampling import filter_logits, generate, guide
from mars_superres import decode


def prompts(model, rows: int = 3, low=(2, 2), seed: int = 0):
    """(cond batch, uncond batch) of left-padded super-resolution prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = [], []
    for row in range(rows):
        low_codes = torch.randint(0, model.vocab.num_codes, low, generator=g)
        text = torch.randint(0, model.vocab.text_size, (2 + 2 * row,), generator=g).tolist()
        cond.append(model.prompt_ids(text, low_codes))
        uncond.append(model.prompt_ids(text[:1], low_codes))
    return seq.collate(cond, model.vocab), seq.collate(uncond, model.vocab)


def run(model, cond, uncond, slots, **options):
    return decode(
        model, cond["input_ids"], slots, cond["attention_mask"],
        uncond_ids=uncond["input_ids"], uncond_attention_mask=uncond["attention_mask"], **options,
    )


@pytest.mark.parametrize("image_positions,hints,radius", [(0, False, 0), (26, False, 0), (26, True, 0), (26, True, 1)])  # 26: the tightest table for 25 slots
def test_exact_greedy_is_one_head_greedy_token_for_token(build_tiny_superres, image_positions, hints, radius):
    model = build_tiny_superres(tokens_per_step=8, image_positions=image_positions, aligned_hints=hints, hint_radius=radius)
    cond, uncond = prompts(model)
    slots = seq.image_slots(4, 5, model.vocab, row_end=True)  # 25 slots, row ends and <image_end> placed
    reference, one = run(model, cond, uncond, slots, tokens_per_step=1, cfg_scale=1.5)
    assert one.forward_passes == len(slots)
    for K in (2, 4, 8):
        tokens, stats = run(model, cond, uncond, slots, tokens_per_step=K, mode="exact", cfg_scale=1.5)
        assert torch.equal(tokens, reference), K
        rows = len(tokens)  # every token of a row but maybe its last is kept by a pass:
        assert rows * (len(slots) - 1) <= sum(stats.accepted) <= rows * len(slots)
        assert stats.forward_passes < len(slots)
        assert stats.mean_accepted_length > 1


def test_one_head_greedy_is_semvies_own_sampler(build_tiny_superres):
    """With the type embedding at zero, K=1 decoding is mars_semvie.sampling.generate on the same prompts."""
    model = build_tiny_superres(tokens_per_step=2, image_positions=40)
    with torch.no_grad():
        model.hires_embedding.zero_()
    cond, uncond = prompts(model)
    slots = seq.image_slots(3, 4, model.vocab, row_end=True)
    tokens, _ = run(model, cond, uncond, slots, tokens_per_step=1, cfg_scale=2.0)
    expected = generate(
        model.semvie, cond["input_ids"], len(slots), cond["attention_mask"], uncond_ids=uncond["input_ids"],
        uncond_attention_mask=uncond["attention_mask"], cfg_scale=2.0, allowed_ids=model.vocab.code_ids, forced=slots,
    )
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
def test_fast_mode_makes_ceil_n_over_k_forward_passes(build_tiny_superres, K):
    model = build_tiny_superres(tokens_per_step=8)
    cond, uncond = prompts(model, rows=2)
    slots = seq.image_slots(4, 5, model.vocab, row_end=True)  # N = 25
    calls = []
    hook = model.semvie.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    try:
        tokens, stats = run(model, cond, uncond, slots, tokens_per_step=K, mode="fast", cfg_scale=1.5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == stats.forward_passes == math.ceil(len(slots) / K)
    assert all(n == K for n in calls[1:])  # after the prompt, K tokens per pass
    assert stats.seconds > 0  # timed (the benchmark reads it)
    assert tokens.shape == (2, len(slots))
    codes = seq.codes_from_ids(tokens[0], 4, 5, model.vocab)  # the layout's specials are in place
    assert codes.shape == (4, 5)


@pytest.mark.parametrize("K,radius", [(1, 0), (4, 0), (4, 1)])
def test_decoding_reads_the_hints_training_reads(build_tiny_superres, K, radius):
    """Greedy fast decoding with aligned hints, teacher-forced through the training forward: every
    drawn code is the argmax of the head that drew it (head k at the state k slots before)."""
    model = build_tiny_superres(tokens_per_step=4, image_positions=30, aligned_hints=True, hint_radius=radius)
    cond, _ = prompts(model, rows=2, low=(2, 3))
    slots = seq.image_slots(4, 6, model.vocab, row_end=True)  # a 2x3 grid under a 4x6 one
    tokens, _ = decode(model, cond["input_ids"], slots, cond["attention_mask"], tokens_per_step=K, mode="fast")
    full = torch.cat([cond["input_ids"], tokens], 1)
    mask = torch.cat([cond["attention_mask"], torch.ones_like(tokens)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    h = model(full, mask, positions).hidden
    L = cond["input_ids"].shape[1]
    hints = model.hints(full)
    for slot, fixed in enumerate(slots):
        if fixed is not None:
            continue
        k = slot % K + 1  # the head that drew it, at the state of slot - k
        state = L - 1 + slot - k + 1
        hint = hints.index(hints.slots()[:, state : state + 1, None] + torch.arange(2, K + 1))[:, 0]
        logits = model.visual_logits(h[:, state], K, hint if K > 1 else None)[:, k - 1]
        codes = slice(model.vocab.code_offset - model.vocab.text_size, model.vocab.special_offset - model.vocab.text_size)
        assert torch.equal(model.vocab.codes_to_ids(logits[:, codes].argmax(-1)), tokens[:, slot]), slot


def chi2_limit(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over outcomes expected >= 5 times (the rest pooled), and its df."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def head1_joint(model, cond, uncond, n: int, cfg_scale: float, temperature: float, top_k: int) -> torch.Tensor:
    """The exact distribution of the first n codes under head-1 sampling, by teacher forcing
    every prefix (computed with mars_semvie.sampling's guidance and filters)."""
    v = model.vocab
    T, C = v.text_size, v.num_codes
    codes = slice(v.code_offset - T, v.special_offset - T)
    joint = torch.ones(1)
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(n):
        rows = len(prefixes)
        ids = torch.cat([cond["input_ids"].expand(rows, -1), v.codes_to_ids(prefixes)], 1)
        un = torch.cat([uncond["input_ids"].expand(rows, -1), v.codes_to_ids(prefixes)], 1)
        logits = torch.cat([model.visual_logits(model.hidden(x)[:, -1], 1)[:, 0] for x in (ids, un)])
        scores = filter_logits(guide(logits, cfg_scale)[:, codes] / temperature, top_k)
        step = scores.softmax(-1)  # (rows, C)
        joint = (joint[:, None] * step).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(C, 0), torch.arange(C).repeat(rows)[:, None]], 1)
    return joint


@pytest.mark.parametrize("K", [2, 3])
def test_exact_sampling_has_the_distribution_of_head_one_sampling(build_tiny_superres, K):
    """Joint distribution of K codes over 4 codes (4**K outcomes), 6,000 draws, fixed seeds:
    Pearson's chi-square against the exact head-1 distribution stays under its 1e-4 quantile;
    fast mode (independent heads, not the model's distribution) is far above it."""
    model = build_tiny_superres(tokens_per_step=K, num_codes=4, seed=3)
    cond, uncond = prompts(model, rows=1, seed=1)
    options = dict(cfg_scale=1.5, temperature=1.0, top_k=3)
    with torch.no_grad():
        expected = head1_joint(model, cond, uncond, K, **options)
    draws = 6000
    cond_b = {k: t.expand(draws, -1) for k, t in cond.items()}
    uncond_b = {k: t.expand(draws, -1) for k, t in uncond.items()}
    slots = [None] * K
    results = {}
    for mode in ("exact", "fast"):
        tokens, _ = run(model, cond_b, uncond_b, slots, tokens_per_step=K, mode=mode, generator=torch.Generator().manual_seed(7), **options)
        index = (model.vocab.ids_to_codes(tokens) * (4 ** torch.arange(K - 1, -1, -1))).sum(1)
        results[mode] = chi2(torch.bincount(index, minlength=4**K).float(), expected)
    stat, df = results["exact"]
    assert stat < chi2_limit(df), results
    stat, df = results["fast"]
    assert stat > 3 * chi2_limit(df), results


def test_exact_sampling_keeps_drafts_row_by_row(build_tiny_superres):
    """One row at a time (drafts kept and rolled back): 600 runs of 3 codes match head-1 sampling
    (measured: chi-square 17.0 on 16 df, limit 46.2; 1,156 of 1,200 drafts kept)."""
    model = build_tiny_superres(tokens_per_step=3, num_codes=4, seed=3, trained=False)
    cond, uncond = prompts(model, rows=1, seed=1)
    options = dict(cfg_scale=1.5, temperature=2.0, top_k=0)
    with torch.no_grad():
        expected = head1_joint(model, cond, uncond, 3, **options)
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(64)
    kept = 0
    for _ in range(600):
        tokens, stats = run(model, cond, uncond, [None] * 3, tokens_per_step=3, mode="exact", generator=g, **options)
        counts[int((model.vocab.ids_to_codes(tokens[0]) * torch.tensor([16, 4, 1])).sum())] += 1
        kept += sum(a - 1 for a in stats.accepted)
    stat, df = chi2(counts, expected)
    assert stat < chi2_limit(df), (stat, df)
    assert kept > 100  # the path that keeps drafts was taken often


def test_bad_options_are_refused(build_tiny_superres):
    model = build_tiny_superres(tokens_per_step=2)
    cond, uncond = prompts(model, rows=1)
    with pytest.raises(ValueError, match="tokens_per_step=3"):
        run(model, cond, uncond, [None], tokens_per_step=3)
    with pytest.raises(ValueError, match="mode"):
        run(model, cond, uncond, [None], tokens_per_step=2, mode="fastest")
    with pytest.raises(ValueError, match="uncond_ids"):
        decode(model, cond["input_ids"], [None], cond["attention_mask"], cfg_scale=2.0)
