"""The multimodal vocabulary of MARS: one id space for text tokens, visual codes and specials.

Layout (``T`` = the wrapped LLM's vocabulary size, i.e. its embedding rows, ``C`` = codes)::

    [0, T)                 text tokens: the LLM's own ids, unchanged (Qwen-7B: T = 151,936)
    [T, T + C)             visual codes: id = T + code (C = 8192 in the paper)
    [T + C, T + C + 6)     special tokens, in the order of ``SPECIAL_TOKENS``
    [T + C + 6, size)      padding rows up to a multiple of 8; never produced by a tokenizer,
                           never a target, masked out when sampling

Qwen-7B: 151,936 + 8192 + 6 = 160,134 -> padded to 160,136, the paper's figure.

Modality, and so the expert that processes a token, follows from the id alone:
``is_visual(ids)`` is true for every id at or beyond ``T`` (codes, specials and padding rows),
i.e. for every token the text LLM does not know. The specials belong to the visual side
because their embeddings are new, trainable rows, like the codes'; ``<image_start>`` is the
position that predicts the first code, so it runs through the visual expert as the codes do.
``is_code(ids)`` is the narrower test for visual codes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Qwen's end-of-text token, a text token of the LLM's own: it ends every text the LLM is
# trained on and frames every prompt (``mars_semvie.sequences``). Defined here, not beside
# the text data module, so that generation imports no Lightning.
ENDOFTEXT = "<|endoftext|>"

# The six special tokens, in id order after the codes.
SPECIAL_TOKENS = (
    "image_start",  # <image start>: opens an image; predicts its first code
    "image_end",  # <image end>: closes an image
    "image_row_end",  # ends a row of codes, for token grids of varying aspect ratio (stage II)
    "task_t2i",  # optional task marker: text-to-image
    "task_caption",  # optional task marker: image captioning
    "pad",  # padding of multimodal batches (always masked out of attention and loss)
)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class MultimodalVocab:
    """Ids of the multimodal vocabulary built on a text vocabulary of ``text_size`` entries."""

    text_size: int  # rows of the LLM's embedding table (config.vocab_size), not len(tokenizer)
    num_codes: int = 8192  # visual codebook size of the image tokenizer
    pad_to_multiple_of: int = 8

    @property
    def code_offset(self) -> int:
        """Id of visual code 0."""
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.num_codes

    @property
    def size(self) -> int:
        """Rows of the multimodal embedding table and logits (padded)."""
        return round_up(self.special_offset + len(SPECIAL_TOKENS), self.pad_to_multiple_of)

    @property
    def visual_size(self) -> int:
        """Rows owned by the visual side (codes, specials, padding): vision head outputs."""
        return self.size - self.text_size

    def special(self, name: str) -> int:
        """Id of a special token, e.g. ``vocab.special("image_start")``."""
        return self.special_offset + SPECIAL_TOKENS.index(name)

    @property
    def image_start(self) -> int:
        return self.special("image_start")

    @property
    def image_end(self) -> int:
        return self.special("image_end")

    @property
    def image_row_end(self) -> int:
        return self.special("image_row_end")

    @property
    def pad(self) -> int:
        return self.special("pad")

    @property
    def code_ids(self) -> slice:
        """Slice of the visual codes along the vocabulary axis (e.g. to sample only codes)."""
        return slice(self.code_offset, self.special_offset)

    @property
    def used_ids(self) -> slice:
        """Slice of every real id (text, codes, specials); the rest are padding rows."""
        return slice(0, self.special_offset + len(SPECIAL_TOKENS))

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.code_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if not bool(self.is_code(ids).all()):
            raise ValueError("ids_to_codes got ids that are not visual codes")
        return ids - self.code_offset

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """True where the token runs through the visual expert (codes and specials)."""
        return ids >= self.text_size

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.code_offset) & (ids < self.special_offset)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.text_size)
