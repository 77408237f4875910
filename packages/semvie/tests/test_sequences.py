"""Sequence layouts: prompts, text-to-image and captioning sequences, left-padded batches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mars_semvie import MultimodalVocab
from mars_semvie.sequences import (
    IGNORE,
    build_caption,
    build_t2i,
    caption_prompt_ids,
    code_grid,
    codes_from_ids,
    collate,
    encode_caption,
    encode_prompt,
    image_ids,
    image_slots,
    resolution_ids,
    t2i_prompt_ids,
    unconditional_prompt,
)
from mars_semvie.text import qwen_tokenizer
from mars_semvie.vocab import ENDOFTEXT

T, NUM_CODES = 96, 16  # the tiny configs of conftest
VOCAB = MultimodalVocab(T, NUM_CODES)


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer(trim_to=["96x64 a red circle left of a blue square", "一个红色的圆形在一个蓝色的正方形的左边"])


def test_prompt_framing_and_resolution(tokenizer):
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    ids = encode_prompt(tokenizer, "a red circle")
    assert ids[0] == ids[-1] == eot and tokenizer.decode(ids[1:-1]) == "a red circle"
    size = resolution_ids(tokenizer, (96, 64))
    assert size[-1] == eot and tokenizer.decode(size[:-1]) == "96x64" and resolution_ids(tokenizer, None) == []
    # stage II: the resolution ends the prompt, so the caption's ids (and states) are stage I's
    assert encode_prompt(tokenizer, "a red circle", (96, 64)) == ids + size
    assert unconditional_prompt(tokenizer) == [eot, eot]
    assert unconditional_prompt(tokenizer, (96, 64)) == [eot, eot, *size]
    planned = encode_prompt(tokenizer, "a red circle left of a blue square", plan=" red circle left of blue square ")
    assert planned.count(eot) == 3 and planned[-1] == eot
    assert tokenizer.decode(planned[planned.index(eot, 1) + 1 : -1]) == "red circle left of blue square"
    sized = encode_prompt(tokenizer, "a red circle left of a blue square", (96, 64), plan=" red circle left of blue square ")
    assert sized == planned + size  # after the plan too
    caption = encode_caption(tokenizer, "一个红色的圆形 ")
    assert caption[-1] == eot and tokenizer.decode(caption[:-1]) == "一个红色的圆形"


def test_t2i_layout_and_labels():
    codes = torch.tensor([[1, 2], [3, 4]])
    text = [5, 6, 7]
    ids, labels = build_t2i(text, codes, VOCAB)
    image = [T + 1, T + 2, T + 3, T + 4, VOCAB.image_end]
    assert ids == [5, 6, 7, VOCAB.image_start, *image]
    assert labels == [IGNORE] * 4 + image
    assert ids[: len(text) + 1] == t2i_prompt_ids(text, VOCAB)


def test_row_ends_follow_every_row_and_slots_match():
    codes = torch.arange(6).view(2, 3)
    R = VOCAB.image_row_end
    assert image_ids(codes, VOCAB, row_end=True) == [T, T + 1, T + 2, R, T + 3, T + 4, T + 5, R, VOCAB.image_end]
    slots = image_slots(2, 3, VOCAB, row_end=True)
    assert slots == [None, None, None, R, None, None, None, R, VOCAB.image_end]
    assert image_slots(2, 2, VOCAB) == [None] * 4 + [VOCAB.image_end]
    assert torch.equal(codes_from_ids(image_ids(codes, VOCAB, row_end=True), 2, 3, VOCAB), codes)
    assert code_grid(96, 64, 16) == (4, 6)
    with pytest.raises(ValueError, match="multiple"):
        code_grid(100, 64, 16)


def test_caption_layout_and_labels():
    codes = torch.tensor([[1, 2], [3, 4]])
    ids, labels = build_caption(codes, [8, 9, 0], VOCAB)
    prompt = caption_prompt_ids(codes, VOCAB)
    assert prompt == [VOCAB.image_start, T + 1, T + 2, T + 3, T + 4, VOCAB.image_end]
    assert ids == prompt + [8, 9, 0] and labels == [IGNORE] * 6 + [8, 9, 0]


def test_collate_left_pads_with_positions_of_real_tokens():
    batch = collate([[1, 2, 3], [4]], VOCAB, labels=[[IGNORE, 2, 3], [4]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [VOCAB.pad, VOCAB.pad, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, 4]]
    assert "labels" not in collate([[1]], VOCAB)


def test_padded_batch_gives_each_sequence_its_own_logits_and_loss(build_tiny_semvie, perturb_visual_weights):
    """Left padding with these positions changes nothing: the layout of training and generation."""
    model, _ = build_tiny_semvie()
    perturb_visual_weights(model)
    short = build_t2i([3, 4], torch.tensor([[1, 2], [3, 4]]), VOCAB)
    long = build_caption(torch.tensor([[5, 6], [7, 8]]), [10, 11, 12, 13, 0], VOCAB)
    batch = collate([short[0], long[0]], VOCAB, labels=[short[1], long[1]])
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
        for row, (ids, _) in enumerate([short, long]):
            alone = model(torch.tensor([ids])).logits[0]
            assert_close(logits[row, -len(ids) :], alone, rtol=1e-4, atol=1e-4)
