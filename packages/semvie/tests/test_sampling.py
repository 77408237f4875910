"""Sampling: guidance in one batch, KV cache on/off, filters, seeds, forced tokens, eos."""

from __future__ import annotations

import pytest
import torch

from mars_semvie.sampling import Decoder, filter_logits, generate, guide, sample_next
from mars_semvie.sequences import collate, image_slots


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, while on a machine shared with other jobs
    every parallel op waits for descheduled workers: measured 10x slower with the default threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(build_tiny_semvie, perturb_visual_weights):
    """A tiny SemVIE whose visual side is not at its initialisation (codes are not all alike)."""
    model, _ = build_tiny_semvie()
    perturb_visual_weights(model)
    return model


def prompts(model, rows=((5, 9, 14), (3, 71), (40, 41, 42, 43, 44))):
    """Left-padded text prompts of different lengths, each followed by <image_start>."""
    return left_pad(model, [[*row, model.vocab.image_start] for row in rows])


def uncond(model, batch):
    return left_pad(model, [[model.vocab.image_start]] * batch)


def left_pad(model, rows):
    batch = collate(rows, model.vocab)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_on_and_off_give_identical_greedy_output(model, cfg_scale):
    ids, mask = prompts(model)
    u_ids, u_mask = uncond(model, len(ids))
    kw = dict(uncond_ids=u_ids, uncond_attention_mask=u_mask, cfg_scale=cfg_scale, allowed_ids=model.vocab.code_ids)
    cached = generate(model, ids, 12, mask, kv_cache=True, **kw)
    recomputed = generate(model, ids, 12, mask, kv_cache=False, **kw)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, recomputed)
    assert len(set(cached.flatten().tolist())) > 1  # not a constant output that would hide a bug


def test_cfg_scale_one_equals_no_guidance(model):
    ids, mask = prompts(model)
    u_ids, u_mask = uncond(model, len(ids))
    plain = generate(model, ids, 8, mask, allowed_ids=model.vocab.code_ids)
    scale_one = generate(
        model, ids, 8, mask, uncond_ids=u_ids, uncond_attention_mask=u_mask, cfg_scale=1.0, allowed_ids=model.vocab.code_ids
    )
    assert torch.equal(plain, scale_one)


def test_cfg_scale_zero_follows_the_unconditional_rows(model):
    """Scale 0 samples from the unconditional logits: the halves of the batch are not swapped."""
    ids, mask = prompts(model)
    u_ids, u_mask = left_pad(model, [[7, model.vocab.image_start]] * len(ids))
    guided = generate(
        model, ids, 8, mask, uncond_ids=u_ids, uncond_attention_mask=u_mask, cfg_scale=0.0, allowed_ids=model.vocab.code_ids
    )
    alone = generate(model, u_ids, 8, u_mask, allowed_ids=model.vocab.code_ids)
    assert torch.equal(guided, alone)
    assert not torch.equal(guided, generate(model, ids, 8, mask, allowed_ids=model.vocab.code_ids))


def test_guidance_in_one_batch_equals_two_separate_passes(model):
    ids, mask = prompts(model)
    u_ids, u_mask = uncond(model, len(ids))
    steps, scale, codes = 6, 2.5, model.vocab.code_ids
    one_batch = generate(model, ids, steps, mask, uncond_ids=u_ids, uncond_attention_mask=u_mask, cfg_scale=scale, allowed_ids=codes)

    cond, unc = Decoder(model, ids, mask, steps), Decoder(model, u_ids, u_mask, steps)
    tokens = []
    for _ in range(steps):
        logits = unc.logits + scale * (cond.logits - unc.logits)
        tokens.append(sample_next(logits, allowed_ids=codes))
        cond.append(tokens[-1]), unc.append(tokens[-1])
    assert torch.equal(one_batch, torch.stack(tokens, dim=1))


def test_guide_formula():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cond row, uncond row
    assert torch.equal(guide(logits, 3.0), torch.tensor([[4.0, -2.0]]))


def test_top_k_one_equals_greedy(model):
    ids, mask = prompts(model)
    greedy = generate(model, ids, 8, mask, allowed_ids=model.vocab.code_ids)
    top1 = generate(
        model, ids, 8, mask, temperature=1.5, top_k=1, allowed_ids=model.vocab.code_ids, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy, top1)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p)).squeeze(0).tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert torch.isfinite(filter_logits(probs.log(), top_k=2)).sum() == 2


def test_top_p_and_top_k_restrict_what_is_drawn():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0, 0.0]]).expand(200, 5)
    drawn = sample_next(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    drawn = sample_next(logits, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}


def test_seeds_reproduce_and_rows_do_not_depend_on_their_batch(model):
    ids, mask = prompts(model)
    kw = dict(temperature=1.0, allowed_ids=model.vocab.code_ids)
    seeded = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    first = generate(model, ids, 10, mask, generator=seeded(0, 1, 2), **kw)
    again = generate(model, ids, 10, mask, generator=seeded(0, 1, 2), **kw)
    other = generate(model, ids, 10, mask, generator=seeded(5, 6, 7), **kw)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    alone = generate(model, ids[1:2, -3:], 10, generator=seeded(1), **kw)  # row 1 unpadded, on its own
    assert torch.equal(alone[0], first[1])


def test_sampling_stays_within_allowed_ids_and_places_forced_tokens(model):
    ids, mask = prompts(model)
    vocab = model.vocab
    slots = image_slots(2, 2, vocab, row_end=True)  # c c R c c R <image_end>
    out = generate(model, ids, len(slots), mask, temperature=2.0, allowed_ids=vocab.code_ids, forced=slots)
    assert (out[:, [2, 5]] == vocab.image_row_end).all() and (out[:, 6] == vocab.image_end).all()
    assert vocab.is_code(out[:, [0, 1, 3, 4]]).all()


def test_rows_stop_at_eos(model):
    ids, mask = prompts(model)
    greedy = generate(model, ids, 6, mask, allowed_ids=slice(0, model.vocab.text_size))
    eos = int(greedy[0, 1])  # pretend row 0's second token ends its text
    out = generate(model, ids, 6, mask, allowed_ids=slice(0, model.vocab.text_size), eos_id=eos)
    assert (out[0, 1:] == eos).all()
    stopped = [bool((row == eos).any()) for row in out]
    assert out.shape[1] == (2 if all(stopped) else 6)


def test_invalid_arguments_are_refused(model):
    ids, mask = prompts(model)
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, ids, 4, mask, cfg_scale=2.0)
    with pytest.raises(ValueError, match="forced"):
        generate(model, ids, 4, mask, forced=[None])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(1, 3), top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), temperature=-1.0)
