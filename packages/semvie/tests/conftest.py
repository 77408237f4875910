"""Tiny random Qwen2 / Llama models and SemVIE around them (factories, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from mars_semvie import SemVIEForCausalLM

NUM_CODES = 16


def tiny_llm_config(family: str = "qwen2", **overrides):
    """A 2-layer config with grouped-query attention (4 query heads, 2 key/value heads)."""
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,  # peaked logits: greedy comparisons are not decided by rounding
    )
    kwargs.update(overrides)
    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[family](**kwargs)


@pytest.fixture
def build_tiny_llm():
    def factory(family: str = "qwen2", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_llm_config(family, **overrides)).eval()

    return factory


@pytest.fixture
def build_tiny_semvie(build_tiny_llm):
    """build_tiny_semvie(family=..., visual_expert=..., routing=..., image_positions=..., grid_features=..., grid_heads=...)
    -> (semvie, the wrapped llm)."""

    def factory(
        family: str = "qwen2", visual_expert: bool = True, routing: str = "gather", seed: int = 0, image_positions: int = 0,
        grid_features: int = 0, grid_heads: tuple[str, ...] = (), **overrides
    ):
        llm = build_tiny_llm(family, seed, **overrides)
        model = SemVIEForCausalLM.from_llm(llm, NUM_CODES, visual_expert, routing, image_positions, grid_features, grid_heads).eval()
        return model, llm

    return factory


@pytest.fixture
def perturb_visual_weights():
    """perturb(model): randomise every non-LLM weight (what training the visual side would do)."""

    def perturb(model: SemVIEForCausalLM, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("llm."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)

    return perturb
