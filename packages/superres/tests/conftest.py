"""Tiny super-resolution models around a tiny random Qwen2 (factories; nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mars_semvie import SemVIEForCausalLM
from mars_superres import SuperResConfig, SuperResModel


def tiny_semvie(num_codes: int = 16, image_positions: int = 0, seed: int = 0) -> SemVIEForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3,  # peaked logits: greedy comparisons are not decided by rounding
    )
    llm = AutoModelForCausalLM.from_config(config).eval()
    return SemVIEForCausalLM.from_llm(llm, num_codes, image_positions=image_positions).eval()


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Randomise every trainable weight (what training would do): extra heads then differ from head 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def build_tiny_semvie():
    return tiny_semvie


@pytest.fixture
def perturb_weights():
    return perturb


@pytest.fixture
def build_tiny_superres():
    """build_tiny_superres(tokens_per_step=4, num_codes=16, image_positions=0, trained=True) -> SuperResModel."""

    def factory(tokens_per_step: int = 4, num_codes: int = 16, image_positions: int = 0, trained: bool = True, seed: int = 0, **config):
        semvie = tiny_semvie(num_codes, image_positions, seed)
        model = SuperResModel(semvie, SuperResConfig(tokens_per_step=tokens_per_step, image_positions=image_positions, **config)).eval()
        if trained:
            perturb(model, seed + 1)
        return model

    return factory
