"""App level of SemVIE: apps/inspect_model.py on the Qwen-7B-size config, and the shapes
world's text LLM pretrained by `apps/train.py experiment=shapes_lm` (the restatement corpus) and loaded by path."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from apps.inspect_model import inspect_model
from apps.train import train
from mars_semvie import SemVIEForCausalLM


def test_inspect_model_qwen7b_on_the_meta_device(make_cfg, capsys):
    cfg = make_cfg(["model=semvie_qwen7b"], config_name="inspect_model")
    assert cfg.device == "meta"
    figures = inspect_model(cfg)
    assert figures["vocab_size"] == 160_136
    assert 13.5e9 < figures["total"] < 14.5e9  # the paper: about 14B
    assert 6.0e9 < figures["trainable"] < 7.0e9  # the paper: about 7B
    parts = figures["parts"]
    visual = [name for name in parts if name.startswith(("visual", "vision"))]
    assert figures["trainable"] == sum(parts[name][0] for name in visual)
    assert parts["visual FFN"] == parts["text FFN"][:1] * 2  # a trainable copy of the frozen FFN
    out = capsys.readouterr().out
    assert "160,136" in out and "total" in out


def test_shapes_lm_experiment_pretrains_and_exports_a_qwen_style_checkpoint(make_cfg):
    cfg = make_cfg([
        "experiment=shapes_lm",
        "logger=csv",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "data.make_missing.0.python.3=3000",  # --num: a smaller corpus than the experiment's
        "data.make_missing.1.python.3=500",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=2",
    ])
    metrics = train(cfg)  # writes the restatement corpus first (make_missing)
    assert Path(cfg.data.train_files[0]).exists() and Path(cfg.data.val_files[0]).exists()
    assert metrics["global_step"] == 4 and metrics["val/ppl"] > 1
    llm_dir = Path(cfg.paths.output_dir) / "llm"
    assert llm_dir == Path(cfg.model.export_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    assert llm.config.model_type == "qwen2"
    for caption in ["a red circle left of one blue square", "一个紫色的正方形在一个红色的圆形的上面"]:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.decode(ids) == caption
        assert max(ids) < llm.config.vocab_size
    semvie = SemVIEForCausalLM.from_llm(llm, num_visual_codes=512).eval()
    ids = torch.tensor([ids])
    assert_close(semvie(ids).logits[..., : llm.config.vocab_size], llm(ids).logits)
