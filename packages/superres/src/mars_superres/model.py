"""The MARS super-resolution model (stage III): a SemVIE that reads a caption and a low-resolution
image's codes and writes the high-resolution image's codes, K tokens per step.

Sequence (``mars_semvie.sequences``, stage II layout: rows end with ``<image_row_end>``)::

    [eot] tokens("WxH caption") [eot]  <image_start> low-res codes (R) ... <image_end>
                                       <image_start> high-res codes (R) ... <image_end>
    ^ prompt: the requested high-res size written in as in stage II     ^ targets: the high-res span

    uncond = [eot] tokens("WxH") [eot] <low-res image> <image_start> ...   (caption dropped)

Design choices:
- **A SemVIE started from stage II** (``from_base``): the frozen text LLM, the visual experts,
  embeddings and vision head of a MARS checkpoint directory (``semvie/``). Low- and high-res
  codes share the code embedding and the visual experts: they are tokens of the same VQ
  tokenizer, and the experts already know how to read and write them.
- **Low- vs high-res tokens: a learned type embedding** (``hires_embedding``, one vector, zero
  at the start) added to every token of the high-res span, its ``<image_start>`` included.
  Not new start tokens: the vocabulary (and its padded size) stays the stage II one, so every
  stage II weight loads unchanged, and a zero vector makes the new model compute exactly what
  the stage II model computes on the same ids; the span is known from the layout (the second
  image), so the offset costs one add. Without it, the two grids look alike to the model:
  both images restart their learned offsets (``image_positions``) at their own
  ``<image_start>`` and rotary positions are relative.
- **Image offsets** (``image_positions``): the high-res grid is longer than any stage II grid,
  so the table is extended to ``config.image_positions`` rows; the stage II rows are kept and
  the new rows start at zero (no offset information until trained). A base without the
  table (the paper's model) keeps none.
- **K heads (next-K-token prediction, arXiv 2404.19737).** Head 1 is SemVIE's own head
  (text head + vision head, the full multimodal vocabulary): ``tokens_per_step=1`` is plain
  next-token prediction of the same model. Head k >= 2 predicts the token k - 1 positions
  after head 1's, from the same final hidden state h, through its own **residual MLP block**
  ``z_k = h + mlp_k(norm_k(h))`` and the vision head's output projection (shared; its targets
  are always visual). A residual MLP, not a full transformer block: it reads one position's
  state only, so decoding needs no per-head KV cache and runs a head only where its draft is
  read (the last position of a pass). A full block would need its own cache, with rollback,
  and costs one more layer per head at every position; on the shapes world's 4-layer LLM that
  bounds K=4 fast decoding at K*L/(L+K-1) = 2.3x, below the 2.5x target. ``mlp_k`` is a
  copy of the last visual expert FFN (``norm_k`` of the last layer's post-attention norm)
  with its output projection zeroed: at the start head k predicts what head 1 predicts.
  The heads' weights are stacked (``ResidualHeads``), so all of them run in one batched
  matmul per projection.
- **Aligned low-res hints** (``aligned_hints``; our addition, not in the paper): a learned
  vector per low-res code (``hint_embedding``, zero at the start) is added to the input of
  every high-res token, namely the vector of the low-res code that lies under the *next*
  high-res slot (the one this position predicts; row ends and ``<image_end>`` get a vector of
  their own). Heads k >= 2 get the same for their own target slot, k - 1 further on
  (``head_hint_embedding``, added to h before their MLP). Super-resolution is local: the
  high-res code at (r, c) mostly depends on the low-res code at (r * h // H, c * w // W).
  Without the hint the model must learn to find that code by attention over the whole
  prompt, from 1-D positions; with it, the code is in every high-res input. On the shapes
  world at equal steps this is what lifts the cascade to the base images' scores (docs/LOG.md).
  ``hint_radius`` r > 0 adds the (2r + 1)^2 low-res codes around that one, each offset with its
  own table (outside the grid: the offset's ``none`` row): where an edge crosses a high-res
  patch depends on the low-res cells beside it, which the model would otherwise have to find
  by attention too.
- **Low-res codes on a finer grid** (``lowres_scale`` s; our addition, not in the paper): the
  low-res image is read at s times its size, each pixel repeated (``lowres_input``), so its
  codes lie on the high-res grid when s is the upscaling factor. A tokenizer trained on
  high-res images codes the repeated pixels' staircase edges close to the smooth edges it
  knows: on the shapes world (downsample 8, 64 -> 128 px) the decoded codes of 64 px renders
  read that way match the exact 128 px render's palette at 0.9948, above nearest-neighbour
  (0.9939), where the 8x8 codes of the 64 px render hold 0.9928 (docs/LOG.md). The price:
  s^2 times the low-res span.
- **Loss** = sum over heads of ``head_weights[k] * cross-entropy`` on the high-res span
  (codes, row ends, ``<image_end>``), each head on the positions whose target k tokens
  on is in the span. One model trained with K_max heads serves every K <= K_max.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mars_core.io import atomic_path, write_json_atomic
from mars_semvie import SemVIEForCausalLM
from mars_semvie import sequences as seq
from mars_semvie.sequences import IGNORE

CONFIG_NAME = "superres_config.json"
WEIGHTS_NAME = "superres.safetensors"  # the heads and the type embedding; SemVIE's own weights are in semvie/
SEMVIE_DIR = "semvie"
FORMAT = "mars-superres"


@dataclass
class SuperResConfig:
    tokens_per_step: int = 4  # K_max: heads trained (1 = plain next-token prediction)
    head_weights: list[float] | None = None  # loss weight of each head; None: 1 for every head
    long_side: int = 1024  # high-res long side in pixels (aspect ratio kept): 1024 in the paper, 128 shapes
    image_positions: int = 0  # rows of the learned image-offset table (>= high-res tokens + 1); 0: as the base
    lowres: list[str] = field(default_factory=lambda: ["256x256"])  # "WxH" low-res inputs (the base's sizes)
    aligned_hints: bool = False  # the low-res code under each high-res target slot added to the inputs and heads (docstring)
    hint_radius: int = 0  # with aligned_hints: also the low-res codes up to this many cells around it (docstring)
    lowres_scale: int = 1  # the low-res image encoded at this many times its size, pixels repeated (docstring)

    def __post_init__(self):
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if self.head_weights is not None:
            self.head_weights = [float(w) for w in self.head_weights]
            if len(self.head_weights) != self.tokens_per_step:
                raise ValueError(f"{len(self.head_weights)} head_weights for {self.tokens_per_step} heads")
        self.lowres = [str(r) for r in self.lowres]
        if self.hint_radius < 0 or (self.hint_radius and not self.aligned_hints):
            raise ValueError(f"hint_radius={self.hint_radius} needs aligned_hints=true and must be >= 0")
        if self.lowres_scale < 1:
            raise ValueError(f"lowres_scale must be >= 1, got {self.lowres_scale}")

    @property
    def weights(self) -> list[float]:
        return self.head_weights or [1.0] * self.tokens_per_step


@dataclass
class SuperResOutput:
    loss: torch.Tensor | None = None  # weighted sum over heads
    head_losses: list[torch.Tensor] | None = None  # per head (unweighted)
    hidden: torch.Tensor | None = None  # (B, L, hidden) final hidden states


def parse_size(text: str) -> tuple[int, int]:
    """``"96x64"`` -> (96, 64)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"resolution {text!r} is not WIDTHxHEIGHT in pixels, e.g. 96x64")
    return int(parts[0]), int(parts[1])


def hires_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """The high-res (width, height) of a low-res image: long side ``long_side``, aspect ratio kept,
    the short side rounded to a multiple of the tokenizer's downsampling."""
    scale = long_side / max(width, height)
    short = max(multiple, round(min(width, height) * scale / multiple) * multiple)
    return (long_side, short) if width >= height else (short, long_side)


def lowres_input(images: torch.Tensor, scale: int) -> torch.Tensor:
    """What the VQ tokenizer encodes of low-res images (..., 3, h, w): each pixel repeated
    ``scale`` times along both axes (``SuperResConfig.lowres_scale``; 1: the images)."""
    return images.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else images


def build_triplet(text_ids: list[int], lowres_codes: torch.Tensor, hires_codes: torch.Tensor, vocab) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a training sequence: ``[text] <low-res image> <high-res image>``,
    labels on the high-res image tokens only."""
    context = [*text_ids, *seq.caption_prompt_ids(lowres_codes, vocab, row_end=True)]
    return seq.build_t2i(context, hires_codes, vocab, row_end=True)


class LowresHints:
    """Which low-res code lies under each high-res slot, for the rows of a batch.

    Reads the low-res grid of each row from its first image span (``input_ids``: a training
    sequence or a decoding prompt; rows may differ in size and padding). The high-res grid is
    read from the second span, or given (``hires``: (columns, rows)) when decoding, whose
    prompt ends at the high-res ``<image_start>``. Slot s of the high-res span (stage II
    layout: W codes and a row end per row, then ``<image_end>``; s = 0 is the first code) maps
    to the low-res code at (r * h // H, c * w // W) for r, c = divmod(s, W + 1) and, with
    ``radius``, to the codes around it (``neighbours`` of them in all, row-major offsets); row
    ends, the ``<image_end>``, slots past it and cells outside the grid map to ``none`` (= the
    codebook size). Neighbour n's index is shifted by n * (``none`` + 1): one table holds every
    offset's rows."""

    def __init__(self, input_ids: torch.Tensor, vocab, hires: tuple[int, int] | None = None, radius: int = 0):
        self.none = vocab.num_codes
        around = torch.arange(-radius, radius + 1, device=input_ids.device)
        self.dy, self.dx = (t.flatten() for t in torch.meshgrid(around, around, indexing="ij"))
        self.neighbours = len(self.dy)
        span = (input_ids == vocab.image_start).long().cumsum(1)
        code, row_end = vocab.is_code(input_ids), input_ids == vocab.image_row_end
        low = (span == 1) & code
        self.h = ((span == 1) & row_end).sum(1).clamp(min=1)
        self.w = (low.sum(1) // self.h).clamp(min=1)
        order = torch.sort(low.long(), dim=1, descending=True, stable=True).indices[:, : max(1, int(low.sum(1).max()))]
        self.codes = input_ids.gather(1, order) - vocab.code_offset  # (B, n) row-major; past a row's own n: unused
        if hires is None:
            self.H = ((span == 2) & row_end).sum(1).clamp(min=1)
            self.W = (((span == 2) & code).sum(1) // self.H).clamp(min=1)
        else:
            self.W, self.H = (torch.full_like(self.h, n) for n in hires)
        # slot of every position of a training sequence (arithmetic, so also before the span)
        self.start = (span >= 2).long().argmax(1)  # the high-res <image_start>
        self.hires = span >= 2

    def index(self, slots: torch.Tensor) -> torch.Tensor:
        """Hint indices (B, ..., neighbours) of high-res slots (B, ...): low-res codes or ``none``,
        shifted into their neighbour's rows of the table."""
        expand = (-1,) + (1,) * (slots.dim() - 1)
        W, H, w, h = (t.view(expand) for t in (self.W, self.H, self.w, self.h))
        r, c = slots.div(W + 1, rounding_mode="floor"), slots.remainder(W + 1)
        valid = (slots >= 0) & (r < H) & (c < W)
        row = (r.clamp(0) * h // H).clamp(max=h - 1).unsqueeze(-1) + self.dy
        col = (c * w // W).clamp(max=w - 1).unsqueeze(-1) + self.dx
        h, w = h.unsqueeze(-1), w.unsqueeze(-1)
        inside = valid.unsqueeze(-1) & (row >= 0) & (row < h) & (col >= 0) & (col < w)
        flat = (row.clamp(min=0).minimum(h - 1) * w + col.clamp(min=0).minimum(w - 1)).clamp(0, self.codes.shape[1] - 1)
        picked = self.codes.gather(1, flat.reshape(len(flat), -1)).view_as(flat)
        shift = torch.arange(self.neighbours, device=slots.device) * (self.none + 1)
        return torch.where(inside, picked, self.none) + shift

    def slots(self) -> torch.Tensor:
        """(B, L) the high-res slot of each position of the sequences read (``<image_start>``: -1)."""
        L = self.hires.shape[1]
        return torch.arange(L, device=self.start.device) - self.start[:, None] - 1


class ResidualHeads(nn.Module):
    """Heads 2..K before the shared output projection, their weights stacked (head index first):
    z_k = h + down_k(act(gate_k(x)) * up_k(x)) with x = rms_norm(h + hint_k) * norm_k.

    The LLM's own MLP form (the Qwen family's gated MLP without biases), each head's copy
    stacked with the others so that all heads run in one batched matmul per projection:
    one image per pass is op-bound, and three heads as separate modules took twice as long
    (docs/LOG.md). Each head starts as ``mlp`` (the last visual expert FFN) after ``norm`` (the
    last layer's post-attention norm), its down projection zeroed: head k then predicts what
    head 1 predicts."""

    def __init__(self, heads: int, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not hasattr(mlp, "act_fn") or any(p is None or p.bias is not None for p in projections):
            raise ValueError(f"the next-K-token heads copy a gated MLP without biases (gate_proj, up_proj, down_proj, act_fn), not {type(mlp).__name__}")
        gate, up, down = (p.weight.detach() for p in projections)
        self.eps = norm.variance_epsilon
        self.act = mlp.act_fn
        self.norm = nn.Parameter(norm.weight.detach().expand(heads, -1).clone())  # (heads, hidden)
        self.gate_up = nn.Parameter(torch.cat([gate, up]).T.expand(heads, -1, -1).clone())  # (heads, hidden, 2 * inner)
        self.down = nn.Parameter(torch.zeros_like(down.T).expand(heads, -1, -1).clone())  # (heads, inner, hidden)

    def forward(self, h: torch.Tensor, hint: torch.Tensor | None = None, heads: slice = slice(None)) -> torch.Tensor:
        """States (..., n, hidden) of the n heads ``heads`` (indices into 2..K) at h (..., hidden);
        ``hint`` (..., n, hidden) is added before the norm."""
        norm, gate_up, down = self.norm[heads], self.gate_up[heads], self.down[heads]
        x = h.unsqueeze(-2) if hint is None else h.unsqueeze(-2) + hint
        x = x.expand(*h.shape[:-1], len(norm), h.shape[-1]).reshape(-1, len(norm), h.shape[-1]).transpose(0, 1)
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * norm.unsqueeze(1)  # (n, rows, hidden)
        gate, up = torch.bmm(x, gate_up).chunk(2, dim=-1)
        out = torch.bmm(self.act(gate) * up, down).transpose(0, 1)  # (rows, n, hidden)
        return h.unsqueeze(-2) + out.view(*h.shape[:-1], len(norm), h.shape[-1])


class SuperResModel(nn.Module):
    """SemVIE + high-res type embedding + K-1 extra heads; see the module docstring."""

    def __init__(self, semvie: SemVIEForCausalLM, config: SuperResConfig):
        super().__init__()
        self.semvie = semvie
        self.config = config
        self.vocab = semvie.vocab
        ref = semvie.vision_head.weight
        hidden = semvie.llm.config.hidden_size
        self.hires_embedding = nn.Parameter(torch.zeros(hidden, dtype=ref.dtype, device=ref.device))
        last = semvie.experts[-1] if semvie.experts is not None else semvie.llm.model.layers[-1]
        norm = semvie.llm.model.layers[-1].post_attention_layernorm
        self.extra_heads = ResidualHeads(config.tokens_per_step - 1, norm, last.mlp) if config.tokens_per_step > 1 else None
        self.hint_embedding = self.head_hint_embedding = None
        if config.aligned_hints:  # per neighbour: the codebook, then ``none`` (row ends, <image_end>); zero: no effect at the start
            rows = (self.vocab.num_codes + 1) * (2 * config.hint_radius + 1) ** 2
            self.hint_embedding = nn.Embedding(rows, hidden, device=ref.device, dtype=ref.dtype)
            self.head_hint_embedding = nn.Embedding(rows, hidden, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.hint_embedding.weight)
            nn.init.zeros_(self.head_hint_embedding.weight)
        self._grow_image_positions(config.image_positions)

    def _grow_image_positions(self, rows: int) -> None:
        if self.semvie.config.grid_features:  # the decoders roll back the cache's image offset only
            raise ValueError("the base SemVIE places codes by grid_features: super-resolution does not support it yet")
        table = self.semvie.image_position
        if table is None and rows:
            raise ValueError(f"image_positions={rows}, but the base SemVIE has no learned image offsets: set image_positions=0")
        if table is None or rows <= table.num_embeddings:
            return
        grown = nn.Embedding(rows, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[: table.num_embeddings] = table.weight
        grown.weight.requires_grad_(table.weight.requires_grad)
        self.semvie.image_position = grown
        self.semvie.config.image_positions = rows

    @classmethod
    def from_base(cls, base_path: str | Path, config: SuperResConfig, llm_path: str | None = None) -> SuperResModel:
        """Start from a MARS checkpoint directory (its ``semvie/``: frozen LLM, visual experts)."""
        semvie_dir = Path(base_path) / SEMVIE_DIR
        if not semvie_dir.is_dir():
            raise FileNotFoundError(f"base_path={base_path} is not a MARS checkpoint directory: no {SEMVIE_DIR}/")
        return cls(SemVIEForCausalLM.from_pretrained(semvie_dir, llm_path=llm_path), config)

    @property
    def num_heads(self) -> int:
        return self.config.tokens_per_step

    # ----------------------------------------------------------------------------- layout
    def prompt_ids(self, text_ids: list[int], lowres_codes: torch.Tensor) -> list[int]:
        """``[prompt text ids] <low-res image> <image_start>``: what decoding feeds."""
        return seq.t2i_prompt_ids([*text_ids, *seq.caption_prompt_ids(lowres_codes, self.vocab, row_end=True)], self.vocab)

    def build(self, text_ids: list[int], lowres_codes: torch.Tensor, hires_codes: torch.Tensor) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a training sequence (``build_triplet``)."""
        return build_triplet(text_ids, lowres_codes, hires_codes, self.vocab)

    def hires_span(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) True from the second ``<image_start>`` of a sequence on: the high-res image."""
        return (input_ids == self.vocab.image_start).long().cumsum(1) >= 2

    # ---------------------------------------------------------------------------- forward
    def hints(self, input_ids: torch.Tensor, hires: tuple[int, int] | None = None) -> LowresHints | None:
        """The low-res hints of these sequences (None when the model has none); ``hires``
        (columns, rows) of the high-res grid when it is not in ``input_ids`` (decoding)."""
        return LowresHints(input_ids, self.vocab, hires, self.config.hint_radius) if self.config.aligned_hints else None

    @staticmethod
    def input_hints(hints: LowresHints, hires: torch.Tensor) -> torch.Tensor:
        """(B, L, neighbours) the hint indices of whole sequences: each high-res token carries the
        slot after its own (the one it predicts), every other token -1."""
        return torch.where(hires.unsqueeze(-1), hints.index(hints.slots() + 1), -1)

    @staticmethod
    def embed_hints(table: nn.Embedding, hint: torch.Tensor) -> torch.Tensor:
        """The summed vectors (..., hidden) of hint indices (..., neighbours); -1: none (zero).
        One bag per slot: the (..., neighbours, hidden) vectors are never materialised."""
        n = hint.shape[-1]
        weights = (hint >= 0).reshape(-1, n).to(table.weight.dtype)
        summed = F.embedding_bag(hint.clamp(min=0).reshape(-1, n), table.weight, mode="sum", per_sample_weights=weights)
        return summed.view(*hint.shape[:-1], -1)

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, hires=None, hint=None) -> torch.Tensor:
        """Final hidden states (B, L, hidden); ``hires`` (B, L) marks high-res tokens (default:
        from the layout; decoding passes it, since its new tokens follow a cached prompt);
        ``hint`` (B, L, neighbours) the hint indices of each token, -1 for none (default: from
        the layout, for whole training sequences)."""
        hires = self.hires_span(input_ids) if hires is None else hires
        offset = hires.unsqueeze(-1).to(self.hires_embedding.dtype) * self.hires_embedding
        if self.hint_embedding is not None:
            if hint is None:
                hint = self.input_hints(self.hints(input_ids), hires)
            offset = offset + self.embed_hints(self.hint_embedding, hint)
        out = self.semvie(
            input_ids, attention_mask, position_ids, cache=cache, return_logits=False,
            embedding_offset=offset, return_hidden=True,
        )
        return out.hidden

    def head_hint(self, hint: torch.Tensor | None) -> torch.Tensor | None:
        return None if hint is None or self.head_hint_embedding is None else self.embed_hints(self.head_hint_embedding, hint)

    def visual_logits(self, h: torch.Tensor, heads: int, hint: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the first ``heads`` heads over the visual rows of the vocabulary
        (``vocab.visual_size``; id = text_size + index): (..., heads, visual_size). ``hint``
        (..., heads - 1, neighbours): the hint indices of heads 2..K's target slots (aligned hints).

        Head 1 here is the vision head alone: restricted to visual ids (what an image slot may
        draw) its distribution is exactly that of the full multimodal softmax."""
        if not 1 <= heads <= self.num_heads:
            raise ValueError(f"tokens_per_step={heads}: this model has heads 1..{self.num_heads}")
        if heads > 1 and self.head_hint_embedding is not None and hint is None:
            raise ValueError("this model reads aligned low-res hints: pass the heads' hint indices")
        states = h.unsqueeze(-2)
        if heads > 1:
            states = torch.cat([states, self.extra_heads(h, self.head_hint(hint), slice(heads - 1))], dim=-2)
        return self.semvie.vision_head(states)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, heads: int | None = None) -> SuperResOutput:
        """Training: the next-K-token loss on the labelled (high-res) positions.

        Head 1 at position t predicts labels[t+1] over the whole multimodal vocabulary (SemVIE's
        own head: the plain next-token loss); head k predicts labels[t+k] over the visual rows."""
        heads = heads or self.num_heads
        hints = self.hints(input_ids)
        hires = self.hires_span(input_ids)
        hint = None if hints is None else self.input_hints(hints, hires)
        h = self.hidden(input_ids, attention_mask, position_ids, hires=hires, hint=hint)
        if labels is None:
            return SuperResOutput(hidden=h)
        labels = labels.to(h.device)
        real = attention_mask.to(h.device).bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
        T = self.vocab.text_size
        losses = []
        for k in range(1, heads + 1):
            targets = labels[:, k:]
            selected = (targets != IGNORE) & real[:, : labels.shape[1] - k]
            states = h[:, :-k][selected]
            if k == 1:
                logits = self.semvie._heads(states)  # SemVIE's own head: exactly its next-token loss
                goal = targets[selected]
            else:
                extra = None if hints is None else self.head_hint(hints.index(hints.slots()[:, :-k] + k)[selected]).unsqueeze(-2)
                logits = self.semvie.vision_head(self.extra_heads(states, extra, slice(k - 2, k - 1))[:, 0])
                goal = targets[selected] - T
                if bool((goal < 0).any()):
                    raise ValueError("next-K-token targets must be visual tokens (the high-res span)")
            losses.append(F.cross_entropy(logits.float(), goal))
        weights = self.config.weights[:heads]
        loss = sum(w * l for w, l in zip(weights, losses))
        return SuperResOutput(loss=loss, head_losses=losses, hidden=h)

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, llm_path: str | None = None) -> Path:
        """``superres_config.json``, ``superres.safetensors`` (heads, type embedding) and
        ``semvie/`` (SemVIEForCausalLM.save_pretrained: the LLM referenced by its path)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.semvie.save_pretrained(directory / SEMVIE_DIR, llm_path=llm_path)
        own = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("semvie.")}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(own, tmp, metadata={"format": FORMAT})
        write_json_atomic(directory / CONFIG_NAME, {"format": FORMAT, "prompt_layout": seq.PROMPT_LAYOUT, **asdict(self.config)})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, llm_path: str | None = None) -> SuperResModel:
        directory = Path(directory)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, SEMVIE_DIR) if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a super-resolution checkpoint: missing {', '.join(missing)}")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} is not a {FORMAT} config")
        seq.check_prompt_layout(meta.pop("prompt_layout", None), directory / CONFIG_NAME)
        model = cls(SemVIEForCausalLM.from_pretrained(directory / SEMVIE_DIR, llm_path=llm_path), SuperResConfig(**meta))
        missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_NAME), strict=False)
        missing = [k for k in missing if not k.startswith("semvie.")]
        if missing or unexpected:
            raise RuntimeError(f"{directory / WEIGHTS_NAME}: missing {missing}, unexpected {unexpected}")
        return model
