"""The super-resolution model: layout, next-K-token loss, heads, save / load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from mars_semvie import sequences as seq
from mars_superres import SuperResConfig, SuperResModel, hires_size
from mars_superres.model import WEIGHTS_NAME, LowresHints


def batch(model: SuperResModel, rows: int = 3, low=(2, 2), high=(3, 4), seed: int = 0) -> dict:
    """Left-padded training sequences: random prompts of different lengths, random code grids."""
    g = torch.Generator().manual_seed(seed)
    codes = model.vocab.num_codes
    ids, labels = [], []
    for row in range(rows):
        text = torch.randint(0, model.vocab.text_size, (3 + row,), generator=g).tolist()
        x, y = model.build(text, torch.randint(0, codes, low, generator=g), torch.randint(0, codes, high, generator=g))
        ids.append(x)
        labels.append(y)
    return seq.collate(ids, model.vocab, labels)


def test_layout_labels_only_the_hires_image_and_marks_its_span(build_tiny_superres):
    model = build_tiny_superres()
    v = model.vocab
    ids, labels = model.build([5, 6], torch.tensor([[0, 1]]), torch.tensor([[2, 3], [4, 5]]))
    R, S, E = v.image_row_end, v.image_start, v.image_end
    c = v.codes_to_ids
    assert ids == [5, 6, S, c(0), c(1), R, E, S, c(2), c(3), R, c(4), c(5), R, E]
    assert labels == [-100] * 8 + ids[8:]
    span = model.hires_span(torch.tensor([ids]))[0].tolist()
    assert span == [False] * 7 + [True] * 8
    assert model.prompt_ids([5, 6], torch.tensor([[0, 1]])) == ids[:8]


def test_one_head_is_plain_next_token_training_of_the_same_model(build_tiny_superres):
    """K=1: loss and gradients equal SemVIE's own next-token loss on the same sequences."""
    model = build_tiny_superres(tokens_per_step=1).train()
    b = batch(model)
    out = model(**b)
    offset = model.hires_span(b["input_ids"]).unsqueeze(-1).float() * model.hires_embedding
    plain = model.semvie(b["input_ids"], b["attention_mask"], b["position_ids"], b["labels"], return_logits=False, embedding_offset=offset)
    assert_close(out.loss, plain.loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads_k = torch.autograd.grad(out.loss, trainable, allow_unused=True)
    grads_plain = torch.autograd.grad(plain.loss, trainable, allow_unused=True)
    for a, b_ in zip(grads_k, grads_plain):
        if a is None or b_ is None:
            assert a is None and b_ is None
        else:
            assert_close(a, b_)
    # a model with more heads, trained with one, computes the same loss
    more = build_tiny_superres(tokens_per_step=4).train()
    assert_close(more(**batch(more), heads=1).loss, model(**batch(model)).loss)


def test_heads_predict_further_tokens_and_losses_add_up(build_tiny_superres):
    model = build_tiny_superres(tokens_per_step=3, head_weights=[1.0, 0.5, 0.25]).train()
    b = batch(model)
    out = model(**b)
    assert len(out.head_losses) == 3
    assert_close(out.loss, out.head_losses[0] + 0.5 * out.head_losses[1] + 0.25 * out.head_losses[2])
    # head 2's loss is the cross-entropy of its logits against the labels two positions on
    h = out.hidden
    logits = model.visual_logits(h, 2)[:, :, 1]  # (B, L, visual)
    targets = b["labels"][:, 2:]
    mask = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-2][mask], targets[mask] - model.vocab.text_size)
    assert_close(out.head_losses[1], expected)
    out.loss.backward()
    assert model.extra_heads.down.grad[1].abs().sum() > 0
    assert model.hires_embedding.grad.abs().sum() > 0


def test_each_stacked_head_is_the_llms_mlp_block(build_tiny_superres):
    """Head k computes h + mlp(norm(h + hint)) with the LLM's own norm and gated MLP modules
    given its weights, whichever heads are run together."""
    model = build_tiny_superres(tokens_per_step=4)
    heads = model.extra_heads
    norm = model.semvie.llm.model.layers[-1].post_attention_layernorm
    mlp = model.semvie.experts[-1].mlp
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    h, hint = torch.randn(2, 5, heads.norm.shape[1], generator=g), torch.randn(2, 5, 3, heads.norm.shape[1], generator=g)
    everything, last_two = heads(h, hint), heads(h, hint[..., 1:, :], slice(1, 3))
    inner = heads.down.shape[1]
    for k in range(3):
        with torch.no_grad():
            norm.weight.copy_(heads.norm[k])
            mlp.gate_proj.weight.copy_(heads.gate_up[k, :, :inner].T)
            mlp.up_proj.weight.copy_(heads.gate_up[k, :, inner:].T)
            mlp.down_proj.weight.copy_(heads.down[k].T)
        expected = h + mlp(norm(h + hint[..., k, :]))
        assert_close(everything[..., k, :], expected)
        if k:
            assert_close(last_two[..., k - 1, :], expected)


def test_a_new_model_computes_what_the_base_does(build_tiny_superres):
    """Zero type embedding and zeroed head outputs: the stage II model's logits, every head alike."""
    model = build_tiny_superres(tokens_per_step=3, image_positions=32, trained=False)
    b = batch(model)
    h = model(b["input_ids"], b["attention_mask"], b["position_ids"]).hidden
    base = model.semvie(b["input_ids"], b["attention_mask"], b["position_ids"]).logits
    logits = model.visual_logits(h, 3)
    assert_close(logits[..., 0, :], base[..., model.vocab.text_size :])
    assert_close(logits[..., 2, :], logits[..., 0, :])


def test_hints_map_each_hires_slot_to_the_lowres_code_under_it(build_tiny_superres):
    model = build_tiny_superres(aligned_hints=True)
    v = model.vocab
    low = torch.tensor([[1, 2, 3], [4, 5, 6]])  # 2x3 under a 4x6 high-res grid
    b = batch(model, rows=2, low=(2, 3), high=(4, 6))
    ids = b["input_ids"].clone()
    for row in ids:  # put the known low-res grid into both (left-padded) sequences
        start = int((row == v.image_start).nonzero()[0])
        row[start + 1 : start + 1 + 8] = torch.tensor(seq.image_ids(low, v, row_end=True)[:8])
    hints = LowresHints(ids, v)
    slots = torch.arange(-1, 4 * 7 + 2).expand(2, -1)
    got = hints.index(slots)
    none = v.num_codes
    for s, index in zip(slots[0].tolist(), got[0, :, 0].tolist()):
        r, c = divmod(s, 7)
        expected = low[r // 2, c // 2] if s >= 0 and r < 4 and c < 6 else none
        assert index == expected, s
    assert torch.equal(got[1], got[0])
    # radius 1: the 3x3 low-res cells around it, row-major, each offset in its own rows
    around = LowresHints(ids, v, radius=1).index(slots)
    assert around.shape == (*slots.shape, 9)
    for s, indices in zip(slots[0].tolist(), around[0].tolist()):
        r, c = divmod(s, 7)
        for n, index in enumerate(indices):
            y, x = r // 2 + n // 3 - 1, c // 2 + n % 3 - 1
            inside = s >= 0 and r < 4 and c < 6 and 0 <= y < 2 and 0 <= x < 3
            assert index == (int(low[y, x]) if inside else none) + n * (none + 1), (s, n)
    # decoding reads the same from the prompt alone, the high-res grid given
    prompt = [row[: int((row == v.image_start).nonzero()[1]) + 1] for row in ids]
    p = seq.collate([x.tolist() for x in prompt], v)["input_ids"]
    assert torch.equal(LowresHints(p, v, hires=(6, 4)).index(slots), got)
    # training: each high-res input carries the hint of the slot after its own
    h = hints.slots()
    start = int((ids[0] == v.image_start).nonzero()[1])
    assert h[0, start] == -1 and h[0, start + 1] == 0


def test_hints_start_at_zero_and_learn(build_tiny_superres):
    model = build_tiny_superres(tokens_per_step=3, aligned_hints=True, trained=False).train()
    plain = build_tiny_superres(tokens_per_step=3, trained=False).train()
    b = batch(model, low=(2, 2), high=(4, 4))
    out = model(**b)
    assert_close(out.loss, plain(**b).loss)  # zero tables: what the model without hints computes
    model = build_tiny_superres(tokens_per_step=3, aligned_hints=True).train()  # heads' outputs no longer zero
    out = model(**b)
    out.loss.backward()
    assert model.hint_embedding.weight.grad.abs().sum() > 0
    assert model.head_hint_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hint"):
        model.visual_logits(out.hidden, 2)
    with pytest.raises(ValueError, match="hint_radius=1 needs aligned_hints"):
        SuperResConfig(hint_radius=1)


def test_image_offsets_grow_keeping_the_base_rows(build_tiny_semvie, perturb_weights):
    semvie = build_tiny_semvie(image_positions=8)
    perturb_weights(semvie)
    base_rows = semvie.image_position.weight.detach().clone()
    model = SuperResModel(semvie, SuperResConfig(tokens_per_step=2, image_positions=20))
    table = model.semvie.image_position.weight
    assert table.shape[0] == 20 and table.requires_grad
    assert_close(table[:8], base_rows)
    assert not table[8:].any()
    with pytest.raises(ValueError, match="no learned image offsets"):
        SuperResModel(build_tiny_semvie(image_positions=0), SuperResConfig(image_positions=20))


@pytest.mark.parametrize("hints,radius", [(False, 0), (True, 0), (True, 1)])
def test_checkpoint_saves_and_loads(build_tiny_superres, tmp_path, hints, radius):
    model = build_tiny_superres(tokens_per_step=4, image_positions=40, long_side=32, lowres=["16x16"], aligned_hints=hints, hint_radius=radius)
    model.save_pretrained(tmp_path / "sr", llm_path=None)
    weights = load_file(tmp_path / "sr" / WEIGHTS_NAME)
    tables = {"hint_embedding.weight", "head_hint_embedding.weight"} if hints else set()
    assert set(weights) == {"hires_embedding", *tables, "extra_heads.norm", "extra_heads.gate_up", "extra_heads.down"}
    config = json.loads((tmp_path / "sr" / "superres_config.json").read_text())
    assert config["tokens_per_step"] == 4 and config["long_side"] == 32 and config["lowres"] == ["16x16"]
    assert config["aligned_hints"] is hints and config["hint_radius"] == radius
    loaded = SuperResModel.from_pretrained(tmp_path / "sr")
    assert loaded.semvie.config.image_positions == 40
    b = batch(model)
    assert_close(loaded(**b).loss, model(**b).loss)
    with pytest.raises(FileNotFoundError, match="not a super-resolution checkpoint"):
        SuperResModel.from_pretrained(tmp_path)


def test_hires_size_keeps_the_aspect_ratio_on_the_code_grid():
    assert hires_size(64, 64, 128, 16) == (128, 128)
    assert hires_size(96, 64, 128, 16) == (128, 80)
    assert hires_size(256, 384, 1024, 16) == (688, 1024)
    with pytest.raises(ValueError, match="head_weights"):
        SuperResConfig(tokens_per_step=2, head_weights=[1.0])
