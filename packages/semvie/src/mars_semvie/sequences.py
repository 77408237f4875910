"""Sequence layouts of MARS: the one place that says how text and images become token ids.

Training builds its sequences here (``SequenceBuilder``, in the DataLoader workers) and
generation (``mars_app.pipeline``) builds its prompts here, so the two cannot drift apart.

Text framing. The text LLM was pretrained on texts framed as ``<|endoftext|> text
<|endoftext|>`` (``mars_semvie.text``); a prompt keeps exactly that framing, so the frozen
text expert sees the same kind of input it was trained on and its hidden state at the closing
``<|endoftext|>`` has read the whole caption::

    prompt ids   = [eot] tokens(caption) [eot]                          encode_prompt (stage I)
                 = [eot] tokens(caption) [eot] tokens(plan) [eot]       (with a plan)
    stage II     = the above, then tokens(f"{W}x{H}") [eot]             (the resolution, width x
                   height in pixels, e.g. "96x64", written into the prompt as the paper does)
    uncond ids   = [eot] [eot]                    (stage I)             unconditional_prompt
                 = [eot] [eot] tokens(f"{W}x{H}") [eot]   (stage II)

The resolution comes last, after the caption and the plan, because attention is causal: every
text state before it is then exactly what it is in a stage I prompt, so one text LLM, trained
on captions alone, serves both stages (issue 17). Written before the caption, the text LLM had
to be trained with resolutions, and such an LM lost the Chinese order swap (docs/LOG.md);
written between the caption and its closing ``<|endoftext|>``, it hid the relation word.

A plan is text the text expert writes after the prompt before the image is drawn: the
shapes world's LLM continues a caption with its layout restatement (``mars_app.lm_corpus``:
the objects in the image's reading order), so the image reads which object goes where from
explicit tokens instead of working it out through frozen keys and values. Training writes
the restatement of the sample's caption; generation lets the model write it (``mars_app.pipeline``).

The unconditional prompt (classifier-free guidance) is the prompt with no caption tokens; in
stage II it keeps the resolution, so the conditional and unconditional rows of a guided
batch ask for the same grid and guidance only amplifies the content. Training drops a prompt
to it with probability ``uncond_prob`` (0.1).

Layouts (``c`` = a visual code id, ``R`` = ``<image_row_end>``)::

    text-to-image  [prompt ids] <image_start> c c c c (R) c c c c (R) ... <image_end>
                   loss on the image tokens: codes, row ends and <image_end>
    captioning     <image_start> c c c c (R) ... <image_end> [caption ids] [eot]
                   loss on the caption tokens and the closing eot

Codes are row-major. With ``row_end=True`` (stage II: several aspect ratios) every row of
codes is followed by ``<image_row_end>``, so the sequence itself says where rows end; the
requested resolution decides the grid (``code_grid``) and a sampler forces the row ends and
``<image_end>`` at their places (``image_slots``) and samples only codes elsewhere. Stage I
(one square grid) writes no row ends.

Batches are LEFT-padded with ``vocab.pad`` (attention_mask 0, label -100) and position ids
count real tokens only (``cumsum(mask) - 1``), which is what ``SemVIEForCausalLM.generate``
does with a left-padded prompt: a sequence gets the same positions, attention and logits
whether it is padded or not, in training and at generation. Every prompt of a left-padded
batch ends right before the image, so the image tokens sit at the same offsets in every row.

The optional task markers of the vocabulary (``task_t2i``, ``task_caption``) are not used:
the first token already tells the tasks apart (text for text-to-image, ``<image_start>`` for
captioning).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from mars_semvie.vocab import ENDOFTEXT
from mars_semvie.vocab import MultimodalVocab

IGNORE = -100  # label of a position that is not a target


# ------------------------------------------------------------------------------------- text
PROMPT_LAYOUT = "resolution-last"  # written into checkpoints whose prompts hold a resolution


def check_prompt_layout(layout: str | None, where) -> None:
    """Refuse a checkpoint trained on another prompt layout (before 2026-12-03 the resolution came
    first): it would read prompts unlike its training ones and draw wrong without a word."""
    if layout != PROMPT_LAYOUT:
        raise ValueError(
            f"{where} was trained with prompt layout {layout or 'resolution-first (before 2026-12-03)'!r}, "
            f"this code writes {PROMPT_LAYOUT!r} (mars_semvie.sequences): retrain it"
        )


def resolution_text(width: int, height: int) -> str:
    """How a resolution is written into a stage II prompt: width x height in pixels, "96x64"."""
    return f"{int(width)}x{int(height)}"


def _eot(text_tokenizer) -> int:
    eot = text_tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if eot is None or text_tokenizer.convert_ids_to_tokens(eot) != ENDOFTEXT:
        raise ValueError(f"the text tokenizer has no {ENDOFTEXT} token")
    return eot


def encode_prompt(
    text_tokenizer, caption: str, resolution: tuple[int, int] | None = None, plan: str | None = None
) -> list[int]:
    """Text ids of a prompt: ``[eot] tokens(caption) [eot]``, then ``tokens(plan) [eot]`` if a
    plan is given, then (stage II) ``resolution_ids(resolution)``."""
    caption = caption.strip()
    ids = [_eot(text_tokenizer), *(text_tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else [])]
    ids.append(ids[0])
    if plan is not None:
        ids += encode_caption(text_tokenizer, plan)  # tokens(plan) [eot]
    return ids + resolution_ids(text_tokenizer, resolution)


def resolution_ids(text_tokenizer, resolution: tuple[int, int] | None) -> list[int]:
    """``tokens("WxH") [eot]``, the end of a stage II prompt; ``[]`` for None (stage I)."""
    return [] if resolution is None else encode_caption(text_tokenizer, resolution_text(*resolution))


def unconditional_prompt(text_tokenizer, resolution: tuple[int, int] | None = None) -> list[int]:
    """Text ids of the unconditional prompt: the prompt with no caption tokens."""
    return encode_prompt(text_tokenizer, "", resolution)


def encode_caption(text_tokenizer, caption: str) -> list[int]:
    """Text ids of a caption as a captioning target: ``tokens(caption) [eot]``."""
    return [*text_tokenizer(caption.strip(), add_special_tokens=False)["input_ids"], _eot(text_tokenizer)]


# ------------------------------------------------------------------------------------ image
def code_grid(width: int, height: int, downsample: int) -> tuple[int, int]:
    """(rows, columns) of codes for an image of ``width`` x ``height`` pixels."""
    if width % downsample or height % downsample:
        raise ValueError(f"{width}x{height} is not a multiple of the tokenizer's downsampling {downsample}")
    return height // downsample, width // downsample


def image_ids(codes: torch.Tensor, vocab: MultimodalVocab, row_end: bool = False) -> list[int]:
    """The image tokens after ``<image_start>``: codes (h, w) row-major (+ row ends), ``<image_end>``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be a (rows, columns) grid, got shape {tuple(codes.shape)}")
    ids = vocab.codes_to_ids(codes.long())
    if row_end:
        ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), vocab.image_row_end)], dim=1)
    return [*ids.flatten().tolist(), vocab.image_end]


def image_slots(rows: int, columns: int, vocab: MultimodalVocab, row_end: bool = False) -> list[int | None]:
    """The image tokens after ``<image_start>`` as a sampler sees them: ``None`` where a code is
    sampled, the id of the special token where the layout fixes it (row ends, ``<image_end>``)."""
    row = [None] * columns + ([vocab.image_row_end] if row_end else [])
    return row * rows + [vocab.image_end]


def codes_from_ids(ids: Sequence[int] | torch.Tensor, rows: int, columns: int, vocab: MultimodalVocab) -> torch.Tensor:
    """The (rows, columns) code grid of generated image tokens (specials dropped)."""
    ids = torch.as_tensor(ids)
    codes = ids[vocab.is_code(ids)]
    if codes.numel() != rows * columns:
        raise ValueError(f"{codes.numel()} codes for a {rows}x{columns} grid")
    return vocab.ids_to_codes(codes).view(rows, columns)


# -------------------------------------------------------------------------------- sequences
def t2i_prompt_ids(text_ids: Sequence[int], vocab: MultimodalVocab) -> list[int]:
    """What generation feeds before sampling an image: ``[prompt ids] <image_start>``."""
    return [*text_ids, vocab.image_start]


def caption_prompt_ids(codes: torch.Tensor, vocab: MultimodalVocab, row_end: bool = False) -> list[int]:
    """What captioning feeds before sampling text: ``<image_start> [image tokens] <image_end>``."""
    return [vocab.image_start, *image_ids(codes, vocab, row_end)]


def build_t2i(
    text_ids: Sequence[int], codes: torch.Tensor, vocab: MultimodalVocab, row_end: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a text-to-image sequence; labels are the ids on image tokens only."""
    prompt = t2i_prompt_ids(text_ids, vocab)
    image = image_ids(codes, vocab, row_end)
    return prompt + image, [IGNORE] * len(prompt) + image


def build_caption(
    codes: torch.Tensor, caption_ids: Sequence[int], vocab: MultimodalVocab, row_end: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a captioning sequence; labels on the caption ids (with their eot) only."""
    prompt = caption_prompt_ids(codes, vocab, row_end)
    return prompt + list(caption_ids), [IGNORE] * len(prompt) + list(caption_ids)


def collate(
    sequences: Sequence[Sequence[int]], vocab: MultimodalVocab, labels: Sequence[Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Left-pad sequences (and their labels) into a batch.

    Returns ``input_ids`` (pad: ``vocab.pad``), ``attention_mask`` (0 on padding),
    ``position_ids`` (``cumsum(mask) - 1``, 0 on padding) and, with ``labels``, ``labels``
    (-100 on padding).
    """
    length = max(len(s) for s in sequences)
    if labels is not None:
        for row, (ids, row_labels) in enumerate(zip(sequences, labels)):
            if len(row_labels) != len(ids):
                raise ValueError(f"row {row}: {len(row_labels)} labels for {len(ids)} ids")
    # padded Python lists become tensors in one call (batch 64: 2.1 ms, per-row tensor writes 5.6)
    input_ids = torch.tensor([[vocab.pad] * (length - len(ids)) + list(ids) for ids in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in sequences], dtype=torch.long)
    batch_out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }
    if labels is not None:
        batch_out["labels"] = torch.tensor(
            [[IGNORE] * (length - len(row)) + list(row) for row in labels], dtype=torch.long
        )
    return batch_out


# ----------------------------------------------------------------------- training batches
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels", "image_grid")  # image_grid: rows with row ends


def prebuilt(batch: dict) -> dict[str, torch.Tensor] | None:
    """The model inputs of a batch whose sequences a batch stage built in the DataLoader
    workers; None when the batch holds only data (the module builds them itself)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch} if "input_ids" in batch else None


class SequenceBuilder:
    """Training sequences of datamodule batches, built in the DataLoader workers.

    Each sample becomes a text-to-image sequence or (with probability ``caption_prob``) a
    captioning sequence; a text-to-image prompt is dropped to the unconditional prompt with
    probability ``uncond_prob`` (classifier-free guidance). ``plan`` and ``caption_target``
    (callables ``caption -> text``, or None) come from the task plugin: the text written
    between the prompt and the image, and what captioning learns to write (None: the caption).
    With ``resolution_in_prompt`` (stage II) each image's size (its grid times ``downsample``)
    is written into the prompt and rows end with ``<image_row_end>``.

    As a pipeline stage (``__call__(batches, skips, rng)``, ``mars_data.ShardDataModule.batch_stage``)
    it adds ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels`` to every batch
    that has ``codes``, in the workers, so the training process only runs the model; a batch of
    images passes through and the module encodes it, then calls ``build``. A batch whose grid is
    not one of ``grids`` (the sizes the model trains on) is skipped and counted per sample.

    Task draws: training batches draw from the data stream's generator (``mars_core.resume``:
    seeded by seed, epoch, rank and worker, so a resumed run repeats them); with
    ``deterministic`` (validation) from the batch's sample keys, so every validation pass
    scores the same sequences. Token ids of prompts and captions are kept
    in a bounded cache (the shapes world repeats its captions; 200M web captions must not grow
    memory).
    """

    CACHE_SIZE = 100_000

    def __init__(
        self,
        text_tokenizer,
        vocab: MultimodalVocab,
        downsample: int,
        grids: Sequence[tuple[int, int]] | None = None,
        caption_prob: float = 0.0,
        uncond_prob: float = 0.1,
        plan=None,
        caption_target=None,
        resolution_in_prompt: bool = False,
        seed: int = 0,
        deterministic: bool = False,
    ):
        self.text_tokenizer = text_tokenizer
        self.vocab = vocab
        self.downsample = downsample
        self.grids = None if grids is None else {tuple(g) for g in grids}
        self.caption_prob = caption_prob
        self.uncond_prob = uncond_prob
        self.plan = plan
        self.caption_target = caption_target
        self.resolution_in_prompt = resolution_in_prompt
        self.seed = seed
        self.deterministic = deterministic
        self._cache: dict[tuple, list[int]] = {}

    def _cached(self, key: tuple, make) -> list[int]:
        ids = self._cache.get(key)
        if ids is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            ids = self._cache[key] = make()
        return ids

    def prompt_ids(self, caption: str, resolution: tuple[int, int] | None) -> list[int]:
        def make():
            plan = self.plan(caption) if self.plan is not None and caption else None
            return encode_prompt(self.text_tokenizer, caption, resolution, plan)

        return self._cached(("prompt", caption, resolution), make)

    def caption_ids(self, caption: str) -> list[int]:
        def make():
            text = self.caption_target(caption) if self.caption_target is not None else caption
            return encode_caption(self.text_tokenizer, text)

        return self._cached(("caption", caption), make)

    def resolution(self, grid: torch.Tensor) -> tuple[int, int] | None:
        """(width, height) in pixels of a code grid when stage II writes it into prompts."""
        if not self.resolution_in_prompt:
            return None
        rows, columns = grid.shape[-2:]
        return columns * self.downsample, rows * self.downsample

    def build(self, codes: torch.Tensor, captions: Sequence[str], rng) -> dict[str, torch.Tensor]:
        """The batch's left-padded ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``
        and, with row ends, ``image_grid`` (rows, columns of each row's image)."""
        row_end = self.resolution_in_prompt
        ids, labels = [], []
        for grid, caption in zip(codes, captions):
            if rng.random() < self.caption_prob:
                x, y = build_caption(grid, self.caption_ids(caption), self.vocab, row_end)
            else:
                text = "" if rng.random() < self.uncond_prob else caption
                x, y = build_t2i(self.prompt_ids(text, self.resolution(grid)), grid, self.vocab, row_end)
            ids.append(x)
            labels.append(y)
        out = collate(ids, self.vocab, labels)
        if row_end:  # where each code sits in its grid (SemVIEForCausalLM's grid_features)
            out["image_grid"] = torch.tensor([tuple(grid.shape[-2:]) for grid in codes], dtype=torch.long)
        return out

    def __call__(self, batches, skips=None, rng: random.Random | None = None):
        """Pipeline stage: add the sequences to every batch of codes. Training draws from
        ``rng`` (the data stream's, seeded by seed, epoch, rank and worker: a resumed run draws
        what the first run drew); validation (``deterministic``) from the batch's sample keys."""
        rng = rng or random.Random(self.seed)
        for batch in batches:
            codes = batch.get("codes")
            if codes is not None:
                rows, columns = codes.shape[-2:]
                if self.grids is not None and (rows, columns) not in self.grids:
                    if skips is not None:
                        for key, url in zip(batch["key"], batch.get("url", [None] * len(batch["key"]))):
                            skips.skip(url, "untrained_size", f"sample {key}: its {rows}x{columns} code grid is not a trained resolution")
                    continue
                if self.deterministic:
                    rng = random.Random(f"{self.seed}/" + "/".join(map(str, batch["key"])))
                batch = {**batch, **self.build(codes, batch["caption"], rng)}
            yield batch
