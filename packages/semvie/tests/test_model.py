"""SemVIE against the Hugging Face model it wraps (litgpt-style parity), routing, grads, I/O."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from mars_semvie import MultimodalVocab, SemVIEForCausalLM

T = 96  # text vocabulary of the tiny configs (conftest)
NUM_CODES = 16
FAMILIES = ["qwen2", "llama"]


def text_ids(batch=2, length=12, seed=0):
    return torch.randint(0, T, (batch, length), generator=torch.Generator().manual_seed(seed))


def t2i_ids(batch=2, text=8, image=9, seed=0):
    """[text][image_start][codes]: the text-to-image layout."""
    vocab = MultimodalVocab(T, NUM_CODES)
    g = torch.Generator().manual_seed(seed)
    codes = vocab.codes_to_ids(torch.randint(0, NUM_CODES, (batch, image), generator=g))
    start = torch.full((batch, 1), vocab.image_start)
    return torch.cat([text_ids(batch, text, seed), start, codes], dim=1)


def mixed_ids(batch=2, length=20, seed=0):
    """Text and visual ids interleaved at random: every routing boundary case at once."""
    g = torch.Generator().manual_seed(seed)
    vocab = MultimodalVocab(T, NUM_CODES)
    ids = torch.randint(0, vocab.used_ids.stop, (batch, length), generator=g)
    ids[0, :3] = torch.tensor([1, 2, 3])  # a text run
    ids[1, :3] = vocab.codes_to_ids(torch.tensor([1, 2, 3]))  # a visual run
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_text_only_logits_equal_the_wrapped_model(build_tiny_semvie, family, tie):
    model, llm = build_tiny_semvie(family, tie_word_embeddings=tie)
    ids = text_ids()
    logits = model(ids).logits
    assert logits.shape == (2, 12, model.vocab.size)
    assert_close(logits[..., :T], llm(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_logits_with_kv_cache_equal_the_wrapped_model(build_tiny_semvie, family):
    model, llm = build_tiny_semvie(family)
    ids = text_ids(length=14)
    cache = model.new_cache(2, 14)
    chunks = [model(ids[:, :6], cache=cache).logits]  # prefill, then one token at a time, then 3
    chunks += [model(ids[:, i : i + 1], cache=cache).logits for i in range(6, 11)]
    chunks.append(model(ids[:, 11:], cache=cache).logits)
    assert cache.length == 14
    assert_close(torch.cat(chunks, dim=1)[..., :T], llm(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_text_generation_equals_hugging_face_generate(build_tiny_semvie, family):
    model, llm = build_tiny_semvie(family)
    ids = text_ids(length=5)
    ours = model.generate(ids, 8, allowed_ids=slice(0, T))
    mask = torch.ones_like(ids)
    theirs = llm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs[:, 5:])


def test_left_padded_prompts_generate_as_if_alone(build_tiny_semvie):
    model, _ = build_tiny_semvie()
    long, short = t2i_ids(1, text=7, image=0, seed=1), t2i_ids(1, text=4, image=0, seed=2)
    pad = torch.zeros(1, 3, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(batch, 6, attention_mask=mask, allowed_ids=model.vocab.code_ids)
    assert torch.equal(together[0], model.generate(long, 6, allowed_ids=model.vocab.code_ids)[0])
    assert torch.equal(together[1], model.generate(short, 6, allowed_ids=model.vocab.code_ids)[0])
    assert bool(model.vocab.is_code(together).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_weights_change_no_text_output(build_tiny_semvie, perturb_visual_weights, family):
    model, llm = build_tiny_semvie(family)
    ids, t2i = text_ids(), t2i_ids()
    before = model(t2i).logits
    perturb_visual_weights(model)
    assert_close(model(ids).logits[..., :T], llm(ids).logits, rtol=0, atol=0)
    after = model(t2i).logits
    # the prompt positions of a text-to-image sequence are text: their text logits stay put ...
    assert torch.equal(after[:, :8, :T], before[:, :8, :T])
    # ... while the image positions do change
    assert not torch.allclose(after[:, 8:], before[:, 8:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_positions", [0, 24])
def test_gather_routing_equals_computing_both_experts_and_masking(build_tiny_semvie, perturb_visual_weights, family, image_positions):
    routed, _ = build_tiny_semvie(family, routing="gather", image_positions=image_positions)
    masked, _ = build_tiny_semvie(family, routing="mask", image_positions=image_positions)
    perturb_visual_weights(routed)
    masked.load_state_dict(routed.state_dict())
    ids = mixed_ids()
    assert 0 < int(routed.vocab.is_visual(ids).sum()) < ids.numel()
    assert_close(routed(ids).logits, masked(ids).logits)


@pytest.mark.parametrize("image_positions", [0, 24])
def test_mixed_sequence_with_kv_cache_equals_full_forward(build_tiny_semvie, perturb_visual_weights, image_positions):
    model, _ = build_tiny_semvie(image_positions=image_positions)
    perturb_visual_weights(model)
    ids = mixed_ids(length=16)
    cache = model.new_cache(2, 16)
    chunks = [model(ids[:, :9], cache=cache).logits] + [model(ids[:, i : i + 1], cache=cache).logits for i in range(9, 16)]
    assert_close(torch.cat(chunks, dim=1), model(ids).logits, rtol=1e-4, atol=1e-4)  # logits ~10: float32 noise


def grid_ids(vocab, widths=(3, 2), rows=2, text=4):
    """Two text-to-image rows with row ends, grids of ``widths`` columns, then a caption-like tail."""
    out = []
    for width in widths:
        codes = vocab.codes_to_ids(torch.arange(rows * width) % vocab.num_codes).view(rows, width)
        image = torch.cat([codes, codes.new_full((rows, 1), vocab.image_row_end)], dim=1).flatten().tolist()
        row = [5 + i for i in range(text)] + [vocab.image_start, *image, vocab.image_end]
        out.append(row + [7] * (2 + rows * (max(widths) - width)))  # same length: text after the image
    return torch.tensor(out)


def test_grid_features_place_codes_by_their_fraction_of_the_grid(build_tiny_semvie, perturb_visual_weights):
    model, _ = build_tiny_semvie(grid_features=3)
    perturb_visual_weights(model)
    vocab = model.vocab
    ids = grid_ids(vocab, widths=(2, 6))
    grids = torch.tensor([[2, 2], [2, 6]])
    got = model._image_position_embeddings(ids, vocab.is_visual(ids), None, grids)
    start = 4
    # column 0 of 2 and column 1 of 6 both centre at 1/4 of the width; row 1 of 2 in both
    assert_close(got[0, start + 1 + 3], got[1, start + 1 + 7 + 1])
    assert not torch.allclose(got[1, start + 1 + 7], got[1, start + 1 + 7 + 1])
    assert torch.equal(got[:, : start + 1], torch.zeros_like(got[:, : start + 1]))  # prompt and <image_start>: none
    with pytest.raises(ValueError, match="image_grid"):
        model(ids)
    model(ids[:, :start])  # text alone needs no grid


@pytest.mark.parametrize("split", [5, 7, 9])
def test_grid_features_with_kv_cache_equal_full_forward(build_tiny_semvie, perturb_visual_weights, split):
    model, _ = build_tiny_semvie(grid_features=3, image_positions=20)
    perturb_visual_weights(model)
    ids = grid_ids(model.vocab)
    grids = torch.tensor([[2, 3], [2, 2]])
    cache = model.new_cache(2, ids.shape[1])
    chunks = [model(ids[:, :split], cache=cache, image_grid=grids).logits]
    chunks += [model(ids[:, i : i + 2], cache=cache).logits for i in range(split, ids.shape[1], 2)]
    assert_close(torch.cat(chunks, dim=1), model(ids, image_grid=grids).logits, rtol=1e-4, atol=1e-4)


def test_grid_heads_draw_their_grids_rows_and_start_as_the_shared_head(build_tiny_semvie, perturb_visual_weights, tmp_path):
    model, _ = build_tiny_semvie(grid_features=3, grid_heads=("2x6",))
    assert torch.equal(model.grid_heads["2x6"].weight, model.vision_head.weight)
    perturb_visual_weights(model)
    ids = grid_ids(model.vocab, widths=(2, 6))
    grids = torch.tensor([[2, 2], [2, 6]])  # the first row has no head of its own
    out = model(ids, image_grid=grids, return_hidden=True)
    T = model.vocab.text_size
    assert_close(out.logits[0, :, T:], model.vision_head(out.hidden[0]))
    assert_close(out.logits[1, :, T:], model.grid_heads["2x6"](out.hidden[1]))
    assert not torch.allclose(out.logits[1, :, T:], model.vision_head(out.hidden[1]))
    assert_close(out.logits[:, :, :T], model.llm.lm_head(out.hidden))

    labels = ids.clone()
    labels[:, :5] = -100  # the prompt and <image_start>
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    for chunk in (0, 5):  # whole, and in chunks that straddle the two rows
        model.loss_chunk = chunk
        assert_close(model(ids, labels=labels, image_grid=grids, return_logits=False).loss, expected)

    cache = model.new_cache(2, ids.shape[1])
    chunks = [model(ids[:, :7], cache=cache, image_grid=grids).logits]
    chunks += [model(ids[:, i : i + 2], cache=cache).logits for i in range(7, ids.shape[1], 2)]
    assert_close(torch.cat(chunks, dim=1), out.logits, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path / "semvie")
    loaded = SemVIEForCausalLM.from_pretrained(tmp_path / "semvie").eval()
    assert loaded.config.grid_heads == ["2x6"]
    assert_close(loaded(ids, image_grid=grids).logits, out.logits, rtol=0, atol=0)


def test_gradients_reach_only_trainable_weights(build_tiny_semvie):
    model, _ = build_tiny_semvie(image_positions=12)
    model.train()
    ids = t2i_ids()
    labels = ids.clone()
    labels[:, :9] = -100  # loss on the codes only, as in text-to-image training
    model(ids, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("llm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("experts.0.q_proj") for n in trainable)
    assert any(n.startswith("experts.1.mlp") for n in trainable)
    assert {"visual_embed.weight", "image_position.weight", "vision_head.weight"} <= trainable


def test_image_positions_tell_codes_where_they_are_and_leave_text_alone(build_tiny_semvie, perturb_visual_weights):
    model, llm = build_tiny_semvie(image_positions=12)
    perturb_visual_weights(model)
    ids = t2i_ids(1, text=4, image=6)
    vocab = model.vocab
    code = vocab.codes_to_ids(torch.tensor([3]))
    ids[0, 6:] = code  # the same code at offsets 2..6 from <image_start>
    logits = model(ids).logits[0]
    assert not torch.allclose(logits[6], logits[7])  # same token, different offset
    assert_close(logits[:4, :T], llm(ids[:, :4]).logits[0])  # the prompt is the LLM's
    with torch.no_grad():
        model.image_position.weight.zero_()
    without = model(ids).logits[0]
    assert not torch.allclose(without[6:], logits[6:])
    assert torch.equal(without[:4], logits[:4])  # the prompt did not move
    with pytest.raises(ValueError, match="image_positions=12"):
        model(t2i_ids(1, text=2, image=12))
    # text after an image (captioning) may run past the table: it gets no embedding
    caption = torch.cat([t2i_ids(1, text=0, image=4), text_ids(1, length=12)], dim=1)
    assert model(caption).logits.shape == (1, 17, vocab.size)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_prompt_rows_and_skipped_padding_leave_gradients_unchanged(build_tiny_semvie, perturb_visual_weights, family):
    """Gather routing runs text rows with no image before them under no_grad and does not
    compute padding rows at all; the mask reference runs everything with autograd: same loss,
    same gradients. Padding positions count in neither loss, whatever their labels."""
    t2i = t2i_ids(batch=3, seed=1)
    vocab = MultimodalVocab(T, NUM_CODES)
    caption = torch.cat([t2i[:1, 8:], t2i[:1, :8]], dim=1)  # image first, then text: text rows need grads
    ids = torch.cat([t2i, caption])
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = vocab.pad, 0  # left padding
    grads = []
    for routing in ("gather", "mask"):
        model, _ = build_tiny_semvie(family, routing=routing)
        perturb_visual_weights(model)
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 3] = -100  # predicted by a padding position
        assert_close(loss, model(ids, attention_mask=mask, labels=labels).loss)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_loss_matches_cross_entropy_of_shifted_logits(build_tiny_semvie):
    model, _ = build_tiny_semvie()
    ids = mixed_ids()
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    keep = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1][keep], labels[:, 1:][keep])
    assert_close(out.loss, expected)
    # training skips the logits of positions without a target: same loss, same gradients
    lean = model(ids, labels=labels, return_logits=False)
    assert lean.logits is None
    assert_close(lean.loss, out.loss)
    head = model.vision_head.weight
    assert_close(torch.autograd.grad(lean.loss, head)[0], torch.autograd.grad(out.loss, head)[0])


def test_gradient_checkpointing_gives_the_same_gradients(build_tiny_semvie):
    grads = []
    for ckpt in (False, True):
        model, _ = build_tiny_semvie()
        model.gradient_checkpointing_enable(ckpt)
        model.train()
        ids = mixed_ids()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert_close(grads[0], grads[1])


def test_ablation_shares_and_tunes_every_weight(build_tiny_semvie):
    model, llm = build_tiny_semvie(visual_expert=False)
    assert model.experts is None
    assert all(p.requires_grad for p in model.parameters())
    ids = text_ids()
    assert_close(model(ids).logits[..., :T], llm(ids).logits)
    expert, _ = build_tiny_semvie(visual_expert=True)
    n_ablation = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for p in expert.parameters())
    assert n_expert > n_ablation


def test_visual_embeddings_start_as_the_mean_text_embedding(build_tiny_semvie):
    model, llm = build_tiny_semvie()
    mean = llm.get_input_embeddings().weight.mean(0)
    assert_close(model.visual_embed.weight, mean.expand_as(model.visual_embed.weight))


def test_save_load_round_trip_references_the_llm_path(build_tiny_llm, perturb_visual_weights, tmp_path):
    build_tiny_llm().save_pretrained(tmp_path / "qwen")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    model = SemVIEForCausalLM.from_llm(llm, NUM_CODES).eval()
    perturb_visual_weights(model)
    model.save_pretrained(tmp_path / "semvie")
    meta = json.loads((tmp_path / "semvie" / "semvie_config.json").read_text())
    assert meta["llm_path"] == str((tmp_path / "qwen").resolve())
    assert not (tmp_path / "semvie" / "llm").exists()  # frozen text weights are not duplicated
    loaded = SemVIEForCausalLM.from_pretrained(tmp_path / "semvie").eval()
    ids = mixed_ids()
    assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.llm.parameters())


def test_save_load_round_trip_of_the_ablation_saves_the_llm(build_tiny_semvie, tmp_path):
    model, _ = build_tiny_semvie("llama", visual_expert=False)
    with torch.no_grad():
        model.llm.model.layers[0].mlp.up_proj.weight.add_(1.0)  # a tuned text weight
    model.save_pretrained(tmp_path / "semvie")
    assert (tmp_path / "semvie" / "llm" / "config.json").exists()
    loaded = SemVIEForCausalLM.from_pretrained(tmp_path / "semvie").eval()
    ids = mixed_ids()
    assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.experts is None


def test_refuses_unsupported_models(build_tiny_llm):
    llm = build_tiny_llm()
    llm.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="wraps"):
        SemVIEForCausalLM.from_llm(llm, NUM_CODES)


def test_chunked_loss_equals_the_whole_loss_and_its_gradients(build_tiny_semvie):
    model, _ = build_tiny_semvie()
    torch.manual_seed(0)
    T = model.vocab.text_size
    ids = torch.cat([torch.randint(0, T, (3, 5)), T + torch.randint(0, model.vocab.num_codes, (3, 12))], dim=1)
    labels = ids.clone()
    labels[:, :5] = -100

    def run(chunk):
        model.zero_grad()
        model.loss_chunk = chunk
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, grads = run(0)
    chunked, chunked_grads = run(7)  # 33 targets: chunks of 7, 7, 7, 7, 5
    torch.testing.assert_close(chunked, whole)
    assert grads.keys() == chunked_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], msg=name)
