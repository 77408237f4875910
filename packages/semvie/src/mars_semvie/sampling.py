"""Sampling from a SemVIE model: classifier-free guidance, temperature, top-k, top-p, KV cache.

``generate(model, input_ids, max_new_tokens, ...)`` continues a batch of prompts one token per
step. It knows nothing of sequence layouts (``mars_semvie.sequences`` builds the prompts):
what to draw at each step is given by ``allowed_ids`` (e.g. only visual codes while drawing an
image, only text ids while writing a caption), ``forced`` (tokens placed deterministically at
given steps, e.g. ``<image_row_end>`` after every row of a stage II grid) and ``eos_id``.

Design choices:
- **Classifier-free guidance in one batch.** The conditional prompts and their unconditional
  counterparts are left-padded together into one batch of 2B rows; each step runs one forward
  pass, splits the last logits into cond (first B rows) and uncond (last B rows) and samples
  from ``uncond + cfg_scale * (cond - uncond)``; the sampled token is appended to both halves.
  One pass over 2B rows reads every weight once per step instead of twice (two passes of B).
  ``cfg_scale == 1`` is exactly the conditional model: the unconditional rows are not run.
- **Guidance on logits, then the filters.** Restriction to ``allowed_ids``, temperature,
  top-k and top-p apply to the guided logits, in that order (as in LlamaGen / Parti-style
  samplers): top-k / top-p cut the guided distribution, not the conditional one.
- **Greedy is temperature 0.** ``top_k=1`` at any temperature gives the same tokens.
- **One generator per row.** ``generator`` may be a list with one ``torch.Generator`` per
  prompt (the pipeline seeds row i with ``seed + i``), so a prompt's sample depends on its
  seed only, not on the batch it was drawn in (up to floating-point differences of padding).
- **KV cache on or off.** ``kv_cache=False`` recomputes the whole sequence at every step (the
  reference, and the baseline of benchmarks/generation.py); both give the same tokens.
- **Left padding.** Prompts of different lengths are left-padded (``sequences.collate``); the mask
  keeps padding out of attention and positions count real tokens only, so a padded prompt
  continues as it would alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the model imports this module
    from mars_semvie.model import SemVIEForCausalLM

Generators = torch.Generator | Sequence[torch.Generator] | None


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance on (2B, V) logits, cond rows first: uncond + s * (cond - uncond)."""
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with every id outside the top-k / the top-p nucleus set to -inf.

    top_k=0 and top_p=1 keep everything. The nucleus is the smallest set of most likely ids
    whose probabilities sum to at least top_p (the most likely id is always kept).
    """
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id when the ids more likely than it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allowed_ids: slice | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    Only ids in ``allowed_ids`` (a slice of the vocabulary; None: all) can be drawn.
    temperature 0 is greedy; otherwise softmax(logits / temperature) after top-k / top-p,
    drawn with ``generator`` (one, or one per row).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    allowed_ids = allowed_ids or slice(0, logits.shape[-1])
    logits = logits[:, allowed_ids].float()
    if temperature == 0:
        index = logits.argmax(dim=-1)
    else:
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
        if generator is None or isinstance(generator, torch.Generator):
            index = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            if len(generator) != len(probs):
                raise ValueError(f"{len(generator)} generators for {len(probs)} rows")
            index = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return index + (allowed_ids.start or 0)


class Decoder:
    """A batch of left-padded prompts fed through the model, then one token per step.

    ``logits`` holds the last position's logits (B, V). With ``kv_cache`` each ``append`` runs
    the new token only, reading the cached keys and values; without, it runs the whole
    sequence again. Positions count real tokens (``attention_mask``), so padding shifts nothing.
    """

    def __init__(
        self,
        model: SemVIEForCausalLM,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 0,
        kv_cache: bool = True,
        image_grid: torch.Tensor | None = None,
    ):
        B, L = input_ids.shape
        self.model = model
        self.image_grid = image_grid  # (B, 2) or (2,): the grid each row draws (grid_features models)
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        if self.mask is None:
            self.positions = torch.arange(L, device=input_ids.device).expand(B, L)
        else:
            self.positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        self.ids = input_ids
        self.cache = model.new_cache(B, L + max_new_tokens) if kv_cache else None
        self.logits = model(input_ids, self.mask, self.positions, cache=self.cache, logits_to_keep=1, image_grid=image_grid).logits[:, -1]

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) as the next position of every row; returns the new last logits."""
        position = self.positions[:, -1:] + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        if self.cache is not None:
            self.positions = position
            out = self.model(tokens[:, None], self.mask, position, cache=self.cache)
        else:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            self.positions = torch.cat([self.positions, position], dim=1)
            out = self.model(self.ids, self.mask, self.positions, logits_to_keep=1, image_grid=self.image_grid)
        self.logits = out.logits[:, -1]
        return self.logits


@torch.no_grad()
def generate(
    model: SemVIEForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    *,
    uncond_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allowed_ids: slice | None = None,
    forced: Sequence[int | None] | None = None,
    eos_id: int | None = None,
    generator: Generators = None,
    kv_cache: bool = True,
    image_grid: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue B left-padded prompts; returns the new tokens (B, n), n <= max_new_tokens.

    uncond_ids / uncond_attention_mask: the B unconditional prompts of classifier-free
        guidance (any length; padded together with the prompts into one batch). Required
        when cfg_scale != 1, ignored when it is 1.
    allowed_ids: the ids sampling may produce (default: every real id of the vocabulary).
    forced: one entry per step, a token id to place at that step or None to sample it
        (``sequences.image_slots`` gives this for an image grid).
    eos_id: a row that produced it produces it again from then on; generation ends early
        when every row has.
    image_grid: (rows, columns) of the image drawn (or read), for every row or (B, 2) per row:
        the place of each code for a ``grid_features`` model (``SemVIEForCausalLM.forward``).
    """
    B = len(input_ids)
    if forced is not None and len(forced) != max_new_tokens:
        raise ValueError(f"forced has {len(forced)} entries for {max_new_tokens} steps")
    guided = cfg_scale != 1
    if guided:
        if uncond_ids is None or len(uncond_ids) != B:
            raise ValueError(f"cfg_scale={cfg_scale} needs {B} unconditional prompts (uncond_ids)")
        input_ids, attention_mask = _stack_left_padded(
            input_ids, attention_mask, uncond_ids, uncond_attention_mask, model.vocab.pad
        )
    if image_grid is not None:
        image_grid = torch.as_tensor(image_grid, device=input_ids.device).long()
        if guided and image_grid.dim() == 2:
            image_grid = torch.cat([image_grid, image_grid])
    decoder = Decoder(model, input_ids, attention_mask, max_new_tokens, kv_cache, image_grid)
    allowed_ids = allowed_ids or model.vocab.used_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        if forced is not None and forced[step] is not None:
            token = torch.full((B,), forced[step], dtype=torch.long, device=input_ids.device)
        else:
            logits = guide(decoder.logits, cfg_scale) if guided else decoder.logits
            token = sample_next(logits, temperature, top_k, top_p, allowed_ids, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        tokens.append(token)
        if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        decoder.append(torch.cat([token, token]) if guided else token)
    return torch.stack(tokens, dim=1)


def _stack_left_padded(ids_a, mask_a, ids_b, mask_b, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded batches as one, left-padded to the longer of the two."""
    length = max(ids_a.shape[1], ids_b.shape[1])

    def widen(ids, mask):
        mask = torch.ones_like(ids) if mask is None else mask
        extra = length - ids.shape[1]
        return (
            F.pad(ids, (extra, 0), value=pad_id),
            F.pad(mask, (extra, 0), value=0),
        )

    (ids_a, mask_a), (ids_b, mask_b) = widen(ids_a, mask_a), widen(ids_b, mask_b)
    return torch.cat([ids_a, ids_b]), torch.cat([mask_a, mask_b])
