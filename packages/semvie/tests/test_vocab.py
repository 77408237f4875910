"""The multimodal vocabulary layout: the paper's numbers on Qwen-7B, ids and modality tests."""

import torch

from mars_semvie import SPECIAL_TOKENS, MultimodalVocab


def test_qwen7b_vocabulary_is_the_papers_160136():
    vocab = MultimodalVocab(151_936, 8192)
    assert vocab.size == 160_136
    assert vocab.code_offset == 151_936
    assert vocab.image_start == 151_936 + 8192 and vocab.image_end == vocab.image_start + 1
    assert vocab.pad == vocab.special_offset + 5 == 160_133
    assert vocab.used_ids == slice(0, 160_134)
    assert vocab.visual_size == 8200
    assert len(SPECIAL_TOKENS) == 6


def test_ids_and_modalities():
    vocab = MultimodalVocab(10, 4)  # 10 + 4 + 6 = 20 -> 24
    assert vocab.size == 24
    ids = torch.arange(vocab.size)
    assert vocab.is_text(ids).tolist() == [True] * 10 + [False] * 14
    assert vocab.is_visual(ids).tolist() == [False] * 10 + [True] * 14
    assert vocab.is_code(ids).nonzero().flatten().tolist() == [10, 11, 12, 13]
    codes = torch.tensor([0, 3])
    assert vocab.codes_to_ids(codes).tolist() == [10, 13]
    assert torch.equal(vocab.ids_to_codes(vocab.codes_to_ids(codes)), codes)
    assert ids[vocab.code_ids].tolist() == [10, 11, 12, 13]
    assert vocab.special("image_row_end") == vocab.image_row_end == 16
