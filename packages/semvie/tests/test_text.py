"""The real Qwen tokenizer (full and trimmed), the text datamodule and LM pretraining/export."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from mars_semvie import MultimodalVocab, SemVIEForCausalLM
from mars_semvie.lm import CausalLMModule
from mars_semvie.text import TextDataModule, qwen_tokenizer

CAPTIONS = [  # every grammar form of the shapes world, both languages
    "a red circle",
    "an image of one blue square",
    "one green triangle on a white background",
    "a yellow circle right of one yellow square",
    "there is one purple triangle below a orange circle",
    "一个红色的圆形",
    "白色背景上有一个蓝色的圆形",
    "一个紫色的正方形在一个红色的圆形的上面",
    "一个绿色的三角形在一个黄色的正方形的左边",
]


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer()


def test_real_qwen_tokenizer_on_english_and_chinese(qwen):
    assert qwen("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert qwen.convert_tokens_to_ids("<|endoftext|>") == qwen.eos_token_id == qwen.pad_token_id == 151643
    zh = "一个紫色的正方形在一个红色的圆形的上面"
    ids = qwen(zh)["input_ids"]
    assert [qwen.decode([i]) for i in ids] == ["一个", "紫色", "的", "正", "方形", "在一个", "红色", "的", "圆形", "的", "上面"]
    vocab = MultimodalVocab(151_936)  # Qwen's embedding rows
    for text in CAPTIONS + ["Hello, world!", "你好，世界！"]:
        ids = qwen(text)["input_ids"]
        assert qwen.decode(ids) == text
        assert bool(vocab.is_text(torch.tensor(ids)).all())


def test_trimmed_tokenizer_splits_the_corpus_exactly_like_qwen(qwen, tmp_path):
    trimmed = qwen_tokenizer(trim_to=CAPTIONS)
    assert len(trimmed) < 1000
    for text in CAPTIONS:
        assert trimmed.tokenize(text) == qwen.tokenize(text)
        assert trimmed.decode(trimmed(text)["input_ids"]) == text
    unseen = "a hexagon 你好"  # not in the corpus: still encoded, in smaller pieces
    assert trimmed.decode(trimmed(unseen)["input_ids"]) == unseen
    trimmed.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(CAPTIONS)["input_ids"] == trimmed(CAPTIONS)["input_ids"]
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"


def write_corpus(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.txt"
    train.write_text("".join(json.dumps({"prompt": c, "lang": "x"}, ensure_ascii=False) + "\n" for c in CAPTIONS * 8))
    val.write_text("\n".join(CAPTIONS[::2]) + "\n")
    return str(train), str(val)


def test_datamodule_reads_jsonl_prompts_and_text_lines(tmp_path):
    train, val = write_corpus(tmp_path)
    dm = TextDataModule([train], [val], batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    eot = dm.tokenizer.eos_token_id
    assert len(dm.train_data) == 72 and len(dm.val_data) == 5
    batch = next(iter(dm.val_dataloader()))
    first = dm.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, : len(first) + 2].tolist() == [eot, *first, eot]
    assert (batch["labels"][0, len(first) + 2 :] == -100).all()
    assert (batch["labels"] != -100).sum() == sum(len(ids) for ids in dm.val_data[:4])


def test_missing_files_are_made_by_the_configured_command_or_named(tmp_path):
    out = tmp_path / "made" / "train.txt"
    make = {"file": str(out), "python": ["-c", f"open({str(out)!r}, 'w').write('a red circle\\n')"]}
    dm = TextDataModule([str(out)], [str(out)], make_missing=[make])
    dm.prepare_data()
    assert out.read_text() == "a red circle\n"
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        TextDataModule([str(tmp_path / "nothing.jsonl")], [str(out)]).prepare_data()


def test_lm_pretraining_exports_a_checkpoint_loadable_like_qwen(tmp_path):
    train, val = write_corpus(tmp_path)
    dm = TextDataModule([train], [val], batch_size=8)
    config = Qwen2Config(
        vocab_size=576, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )
    module = CausalLMModule(config, torch.optim.AdamW, export_dir=str(tmp_path / "llm"))
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=3,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.callback_metrics["val/ppl"] > 1
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    ids = torch.tensor([tokenizer("一个红色的圆形在一个蓝色的正方形的上面")["input_ids"]])
    assert_close(llm(ids).logits, module.llm.eval()(ids).logits)
    semvie = SemVIEForCausalLM.from_llm(llm, num_visual_codes=64).eval()
    assert semvie.vocab.text_size == 576
    assert_close(semvie(ids).logits[..., :576], llm(ids).logits)


def test_lm_refuses_a_tokenizer_larger_than_its_vocabulary(tmp_path):
    train, val = write_corpus(tmp_path)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    module = CausalLMModule(config, torch.optim.AdamW)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="vocab_size"):
        trainer.fit(module, datamodule=TextDataModule([train], [val]))
