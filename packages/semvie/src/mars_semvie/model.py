"""SemVIE: MARS's mixture of a frozen text LLM and trainable visual experts, in one model.

``SemVIEForCausalLM.from_llm(llm)`` wraps a Hugging Face causal LM of the Qwen2 or Llama
family (decoder layers with ``self_attn.{q,k,v,o}_proj``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``; rotary positions) and runs it layer by layer itself:

    ids ──route──> text rows: the LLM's embedding (frozen)   visual rows: new embedding
    every layer:
        x = input_layernorm(h)                                   shared (the LLM's, frozen)
        q, k, v = text rows: LLM q/k/v_proj    visual rows: trainable copies
        ONE causal SDPA attention over the whole sequence, the LLM's rotary embedding
        h = h + (text rows: LLM o_proj         visual rows: trainable copy)(attention)
        h = h + (text rows: LLM mlp            visual rows: trainable copy)(post_attention_layernorm(h))
    logits = concat(LLM lm_head(norm(h)), vision_head(norm(h)))   over the multimodal vocabulary

Design choices:
- Modality comes from the token ids alone (``MultimodalVocab.is_visual``): text ids go to the
  text expert, visual codes and the six specials to the visual expert.
- Routing gathers each modality's rows and runs each token once through its own expert
  (``routing="gather"``). The residual stream is kept in *expert order* (all text rows of the
  batch, then all visual rows), so the FFN, norms and projections see contiguous slices; only
  attention needs sequence order, so q, k, v are gathered back and the attention output is
  gathered forward: four gathers per layer. ``routing="mask"`` runs both experts on every
  token and selects; it is the reference the tests and the benchmark compare against.
  A batch of one modality (text-only input, one-token decoding steps) skips routing entirely,
  so text-only input runs exactly the LLM's computation.
- Text rows with no image before them (a text-to-image prompt) depend on frozen weights only:
  while training they run under ``no_grad``, first in expert order, so the backward pass
  skips them (about a fifth of a stage I step); gradients are unchanged.
- Padding rows (``attention_mask`` 0) are not computed at all while training (zeros in
  their place; their keys are masked and they predict nothing): a stage I batch is about a
  quarter padding, since caption rows are shorter than prompt + plan + image rows. A padding
  position never counts in the loss.
- The output projection is routed too: visual tokens get a trainable copy of ``o_proj``, as
  in CogVLM's visual expert that SemVIE follows. Text rows still use the frozen ``o_proj``,
  so text-only behaviour is exact either way; the copy gives the visual expert the whole
  attention block to adapt, and it is what makes Qwen-7B come to the paper's size (about
  14.3B parameters, 6.5B trainable; without it 13.7B / 6.0B).
- The norms, the rotary embedding and the attention itself are shared. Both heads run on
  every position: a text token may be followed by an image and a code by text (captioning).
  Training (``return_logits=False``) runs them only on the positions that have a target, the
  same loss for less than half the head compute of a stage I batch, ``loss_chunk`` positions
  at a time with the chunk's logits recomputed in the backward pass (``target_loss``): at
  the paper's 160k-entry vocabulary a stage I batch's logits would be ~10 GB in fp32.
- Visual embeddings start as the mean of the LLM's input embedding rows; the vision head is
  initialised like the LLM's linear layers (normal, ``initializer_range``).
- ``image_positions=N`` (0 by default, the paper's model) adds a learned embedding of each
  visual token's offset from its ``<image_start>``: rotary positions are relative and prompts
  differ in length, so without it a code finds its place in the grid only through attention.
- ``grid_heads=["RxC", ...]`` (none by default, the paper's model) gives each listed code grid
  (rows x columns) a vision head of its own, started as a copy of the shared one; a row of a
  batch draws through the head of its ``image_grid``, the shared head serving every other grid.
  Why: the codes that make a scene differ with the grid (at 96x64 a pair's objects sit in the
  middle of a code column, at 64x64 on the line between two), and one head for five grids held
  96x64 pairs at 0.04-0.27 beside 64x64 where a head per grid reached 0.63 (docs/LOG.md).
- ``visual_expert=False`` is the paper's ablation: no copies, every token through the LLM's
  layers, all weights trainable (the new embedding rows and vision head exist in both).
- With ``visual_expert=True`` every LLM weight has ``requires_grad=False``, so text-only
  logits equal the LLM's before and after training.
- No attention dropout and no sliding-window attention (Qwen2's default): a config with
  sliding-window layers is refused rather than silently run with full attention.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from mars_semvie import sampling
from mars_semvie.sequences import IGNORE
from mars_semvie.vocab import MultimodalVocab

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
CONFIG_NAME = "semvie_config.json"
WEIGHTS_NAME = "semvie.safetensors"  # SemVIE's own weights: visual experts, embeddings, head
LLM_DIR = "llm"  # where save_pretrained writes the LLM when it is not referenced by path


def grid_name(rows: int, columns: int) -> str:
    """``"RxC"``: how ``SemVIEConfig.grid_heads`` names a code grid."""
    return f"{rows}x{columns}"


@dataclass
class SemVIEConfig:
    text_vocab_size: int  # the LLM's embedding rows (config.vocab_size), e.g. 151,936
    num_visual_codes: int = 8192  # image tokenizer codebook size
    visual_expert: bool = True  # False: the paper's "w/o visual expert" ablation
    routing: str = "gather"  # "gather" (each token once) or "mask" (both experts, reference)
    image_positions: int = 0  # learned embeddings of a visual token's offset from its <image_start>; 0: none
    grid_features: int = 0  # frequencies per axis of a visual token's place as a fraction of its grid (forward's image_grid); 0: none
    grid_heads: list[str] = field(default_factory=list)  # "RxC" code grids with a vision head of their own (forward's image_grid)

    @property
    def vocab(self) -> MultimodalVocab:
        return MultimodalVocab(self.text_vocab_size, self.num_visual_codes)


@dataclass
class SemVIEOutput:
    logits: torch.Tensor | None  # (batch, length or logits_to_keep, vocab.size); None if not asked for
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None  # (batch, length, hidden): the heads' input (after the final norm), if asked for


class KVCache:
    """Pre-allocated keys and values of every layer, each (batch, kv_heads, max_length, head_dim).

    ``length`` tokens are filled; the model writes new keys/values after them and advances
    ``length`` at the end of each forward.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, head_dim, max_length, dtype, device):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0
        # where the last token sits in its image (-1: in none): offset from <image_start>, rows
        # ended before it (and by it), offset of the last row boundary (<image_start> or a row end)
        self.image_offset = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.image_rows = torch.zeros((batch_size,), dtype=torch.long, device=device)
        self.image_boundary = torch.zeros((batch_size,), dtype=torch.long, device=device)
        self.image_grid: torch.Tensor | None = None  # (batch, 2): rows and columns of each row's image (grid_features)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} tokens > max_length {self.max_length}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@contextmanager
def gathered(params, modify: bool = True):
    """Inside the block, DeepSpeed ZeRO-3 partitioned parameters among ``params`` hold their full
    values; with ``modify``, rank 0's changes are partitioned back at the end. Ordinary
    parameters pass through (no DeepSpeed needed)."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0 if modify else None):
        yield


class VisualExpert(nn.Module):
    """Trainable copies of one decoder layer's attention projections and FFN.

    A layer built under DeepSpeed's ``zero.Init`` (each rank holds a slice of every weight) is
    not deep-copied, which would copy the slices' bookkeeping: the copies are built anew (so
    ``zero.Init`` partitions them too) and the full weights copied in, gathered."""

    def __init__(self, text_layer: nn.Module, config):
        super().__init__()
        attn = text_layer.self_attn
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if not any(hasattr(p, "ds_id") for p in text_layer.parameters()):
            for name in names:
                setattr(self, name, copy.deepcopy(getattr(attn, name)))
            self.mlp = copy.deepcopy(text_layer.mlp)
            return
        dtype = attn.q_proj.weight.dtype
        for name in names:
            src = getattr(attn, name)
            setattr(self, name, nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, dtype=dtype))
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            self.mlp = type(text_layer.mlp)(config)
        finally:
            torch.set_default_dtype(default)
        sources = [*(getattr(attn, name) for name in names), text_layer.mlp]
        pairs = [(d, s) for target, source in zip([*(getattr(self, n) for n in names), self.mlp], sources)
                 for d, s in zip(target.parameters(), source.parameters(), strict=True)]
        with gathered([p for pair in pairs for p in pair]), torch.no_grad():
            for target, source in pairs:
                target.copy_(source)


class Router:
    """Sends the rows of a flattened batch to the text or the visual expert.

    ``visual`` (N,) marks visual rows. Two optional marks apply in gather mode (training):
    ``frozen`` (N,) text rows that need no gradient (run under ``no_grad``), ``skip`` (N,) rows
    nobody reads (padding: not computed at all, their outputs are zeros). In gather mode with
    both modalities present, or with rows to skip, rows are kept in expert order (skipped,
    frozen text, other text, then visual, each in sequence order) between
    ``to_expert_order`` and ``to_sequence_order``; otherwise both are the identity.
    """

    def __init__(
        self, visual: torch.Tensor, mode: str, frozen: torch.Tensor | None = None, skip: torch.Tensor | None = None
    ):
        if mode not in ("gather", "mask"):
            raise ValueError(f"routing must be 'gather' or 'mask', got {mode!r}")
        self.mode = mode
        self.visual = visual
        num_visual = int(visual.sum())
        self.only = "text" if num_visual == 0 else "visual" if num_visual == visual.numel() else None
        gather = mode == "gather"
        skip = skip if gather and skip is not None and bool(skip.any()) else None
        self.permute = gather and (self.only is None or skip is not None)
        if not self.permute:
            return
        group = torch.where(visual, 3, 2)  # skipped 0, frozen text 1, other text 2, visual 3
        if frozen is not None:
            group = torch.where(frozen, 1, group)
        if skip is not None:
            group = torch.where(skip, 0, group)
        counts = torch.bincount(group, minlength=4).tolist()
        self.ends = [sum(counts[: g + 1]) for g in range(3)]  # where skipped, frozen, text rows end
        self.order = torch.argsort(group, stable=True)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(visual.numel(), device=visual.device)

    def to_expert_order(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.order) if self.permute else x

    def to_sequence_order(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.inverse) if self.permute else x

    def apply(self, text_fn: Callable, visual_fn: Callable, x: torch.Tensor) -> torch.Tensor:
        """text_fn on text rows, visual_fn on visual rows of ``x`` (in expert order)."""
        if self.permute:
            skipped, frozen, text = self.ends
            parts = []
            if frozen > skipped:
                with torch.no_grad():
                    parts.append(text_fn(x[skipped:frozen]))
            if text_fn is visual_fn:
                parts.append(text_fn(x[frozen:]))
            else:
                parts += [text_fn(x[frozen:text]), visual_fn(x[text:])]
            out = torch.cat(parts)
            return torch.cat([out.new_zeros(skipped, *out.shape[1:]), out]) if skipped else out
        if text_fn is visual_fn or self.only == "text":
            return text_fn(x)
        if self.only == "visual":
            return visual_fn(x)
        out_text, out_visual = text_fn(x), visual_fn(x)
        mask = self.visual.view(-1, *([1] * (out_text.dim() - 1)))
        return torch.where(mask, out_visual, out_text)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in Qwen2 / Llama; x (B, heads, L, hd), cos/sin (B, L, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SemVIEForCausalLM(nn.Module):
    """A frozen Hugging Face causal LM plus visual experts; see the module docstring."""

    def __init__(self, llm: nn.Module, config: SemVIEConfig):
        super().__init__()
        model_type = getattr(llm.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"SemVIE wraps {SUPPORTED_MODEL_TYPES} causal LMs, got {model_type!r}")
        if "sliding_attention" in (getattr(llm.config, "layer_types", None) or ()):
            raise ValueError("sliding-window attention layers are not supported by SemVIE")
        if config.text_vocab_size != llm.config.vocab_size:
            raise ValueError(f"text_vocab_size {config.text_vocab_size} != LLM vocab {llm.config.vocab_size}")
        self.config = config
        self.vocab = config.vocab
        self.llm = llm
        c = llm.config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

        text_embed = llm.get_input_embeddings().weight
        factory = dict(device=text_embed.device, dtype=text_embed.dtype)
        self.visual_embed = nn.Embedding(self.vocab.visual_size, c.hidden_size, **factory)
        self.vision_head = nn.Linear(c.hidden_size, self.vocab.visual_size, bias=False, **factory)
        # under zero.Init each rank holds slices: the full values inside, rank 0's kept
        with gathered([text_embed, self.visual_embed.weight, self.vision_head.weight]), torch.no_grad():
            self.visual_embed.weight.copy_(text_embed.mean(0, keepdim=True).expand_as(self.visual_embed.weight))
            self.vision_head.weight.normal_(0.0, getattr(c, "initializer_range", 0.02))
        # zeros: a new model computes exactly what it would without them
        self.image_position = nn.Embedding(config.image_positions, c.hidden_size, **factory) if config.image_positions else None
        if self.image_position is not None:
            with gathered([self.image_position.weight]):
                nn.init.zeros_(self.image_position.weight)
        self.grid_projection = None
        if config.grid_features:  # zeros: no effect at the start
            self.grid_projection = nn.Linear(4 * config.grid_features, c.hidden_size, bias=False, **factory)
            with gathered([self.grid_projection.weight]):
                nn.init.zeros_(self.grid_projection.weight)
        self.grid_heads = None
        if config.grid_heads:  # copies of the shared head: a new model computes exactly what it would without them
            self.grid_heads = nn.ModuleDict(
                {grid: nn.Linear(c.hidden_size, self.vocab.visual_size, bias=False, **factory) for grid in config.grid_heads}
            )
            heads = [head.weight for head in self.grid_heads.values()]
            with gathered([self.vision_head.weight, *heads]), torch.no_grad():
                for weight in heads:
                    weight.copy_(self.vision_head.weight)
        llm.requires_grad_(not config.visual_expert)
        self.experts = (
            nn.ModuleList(VisualExpert(layer, c) for layer in llm.model.layers).requires_grad_(True)
            if config.visual_expert
            else None
        )
        self.gradient_checkpointing = False
        self.loss_chunk = 1024  # target positions per head + loss chunk in training (target_loss); 0: all at once

    @classmethod
    def from_llm(
        cls,
        llm: nn.Module,
        num_visual_codes: int = 8192,
        visual_expert: bool = True,
        routing: str = "gather",
        image_positions: int = 0,
        grid_features: int = 0,
        grid_heads: list[str] | tuple[str, ...] = (),
    ) -> SemVIEForCausalLM:
        """Wrap a loaded Qwen2 / Llama causal LM (e.g. ``AutoModelForCausalLM.from_pretrained(path)``)."""
        config = SemVIEConfig(
            llm.config.vocab_size, num_visual_codes, visual_expert, routing, image_positions, grid_features, list(grid_heads)
        )
        return cls(llm, config)

    def parameter_groups(self) -> dict[str, tuple[int, int]]:
        """Parameters per part of the model: {part: (count, trainable count)}; tied weights once."""
        parts = [  # (part, test on the parameter name), first match wins
            ("layer norms (shared)", lambda n: "norm" in n),
            ("text embeddings", lambda n: n.startswith("llm.model.embed_tokens")),
            ("text attention Q/K/V", lambda n: n.startswith("llm.") and any(p in n for p in ("q_proj", "k_proj", "v_proj"))),
            ("text attention output", lambda n: n.startswith("llm.") and "o_proj" in n),
            ("text FFN", lambda n: n.startswith("llm.") and ".mlp." in n),
            ("text head", lambda n: n.startswith("llm.lm_head")),
            ("visual embeddings", lambda n: n.startswith(("visual_embed", "image_position", "grid_projection"))),
            ("visual attention Q/K/V", lambda n: n.startswith("experts.") and any(p in n for p in ("q_proj", "k_proj", "v_proj"))),
            ("visual attention output", lambda n: n.startswith("experts.") and "o_proj" in n),
            ("visual FFN", lambda n: n.startswith("experts.") and ".mlp." in n),
            ("vision head", lambda n: n.startswith(("vision_head", "grid_heads"))),
        ]
        groups = {name: [0, 0] for name, _ in parts}
        for n, p in self.named_parameters():
            name = next((name for name, test in parts if test(n)), None)
            if name is None:
                raise RuntimeError(f"parameter {n} belongs to no part")
            groups[name][0] += p.numel()
            groups[name][1] += p.numel() if p.requires_grad else 0
        return {name: (total, trainable) for name, (total, trainable) in groups.items() if total}

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (training only)."""
        self.gradient_checkpointing = enable

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        ref = self.visual_embed.weight
        return KVCache(
            len(self.llm.model.layers), batch_size, self.num_kv_heads, self.head_dim, max_length, ref.dtype, ref.device
        )

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        embedding_offset: torch.Tensor | None = None,
        return_hidden: bool = False,
        image_grid: torch.Tensor | None = None,
    ) -> SemVIEOutput:
        """Logits over the multimodal vocabulary (and the shifted next-token loss if labels).

        attention_mask: (B, cached + L), 1 for real tokens, 0 for padding, as in Hugging Face.
        position_ids: (B, L); default: consecutive positions after the cached tokens.
        labels: (B, L) targets aligned with input_ids (shifted here), -100 is ignored.
        cache: a ``new_cache(...)`` to read and extend (generation).
        logits_to_keep: if > 0, only the last that many positions get logits.
        return_logits: False (training) skips the logits of the whole sequence: the loss needs
            the heads only on the positions that have a target.
        embedding_offset: (B, L, hidden) added to the token embeddings (e.g. mars_superres's
            learned type embedding of high-resolution tokens); text rows before any image run
            under no_grad while training, so put offsets only on rows after an image.
        return_hidden: also return the final hidden states (the heads' input) as ``hidden``,
            for heads outside this model (mars_superres's next-K-token heads).
        image_grid: (B, 2) rows and columns of the image code grid each row draws or reads
            (``grid_features`` models; kept in the cache for the decoding steps).
        """
        B, L = input_ids.shape
        past = cache.length if cache is not None else 0
        if image_grid is not None:
            image_grid = torch.as_tensor(image_grid, device=input_ids.device).long().expand(B, 2)
            if cache is not None:
                cache.image_grid = image_grid
        elif cache is not None:
            image_grid = cache.image_grid
        heads = self._grid_head_index(image_grid)
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=input_ids.device).expand(B, L)
        device_type = input_ids.device.type  # under autocast SDPA gets q in the autocast dtype, and a mask of q's dtype only
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.visual_embed.weight.dtype
        mask, is_causal = self._attention_mask(attention_mask, L, past, input_ids.device, dtype)
        visual = self.vocab.is_visual(input_ids)
        router = Router(visual.flatten(), self.config.routing, *self._training_rows(visual, attention_mask, past))

        T = self.vocab.text_size
        ids = router.to_expert_order(input_ids.flatten())
        h = router.apply(
            lambda i: self.llm.model.embed_tokens(i.clamp(max=T - 1)),
            lambda i: self.visual_embed((i - T).clamp(min=0)),
            ids,
        )
        if self.image_position is not None or self.grid_projection is not None:
            places = self._image_position_embeddings(input_ids, visual, cache, image_grid)
            h = h + router.to_expert_order(places.flatten(0, 1))
        if embedding_offset is not None:
            h = h + router.to_expert_order(embedding_offset.to(h.dtype).flatten(0, 1))
        cos, sin = self.llm.model.rotary_emb(h, position_ids)
        for i in range(len(self.llm.model.layers)):
            args = (i, h, router, cos, sin, mask, is_causal, cache, B, L)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                h = self._layer(*args)
        if cache is not None:
            cache.length += L

        h = router.to_sequence_order(self.llm.model.norm(h)).view(B, L, -1)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(h.device)
            has_target = targets != IGNORE
            if attention_mask is not None:  # a padding position predicts nothing (and is skipped in training)
                has_target &= attention_mask[:, -L:-1].to(h.device).bool()
            rows = None if heads is None else heads[:, None].expand(B, L - 1)[has_target]
            loss = self.target_loss(h[:, :-1][has_target], targets[has_target], rows)
        logits = None
        if return_logits:
            kept = h[:, -logits_to_keep:] if logits_to_keep else h
            logits = self._heads(kept, None if heads is None else heads[:, None].expand(kept.shape[:2]))
        return SemVIEOutput(logits=logits, loss=loss, cache=cache, hidden=h if return_hidden else None)

    def target_loss(self, h: torch.Tensor, targets: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the heads' logits at hidden states ``h`` (N, d) against ``targets``
        (``heads``: (N,) each position's grid head, ``_grid_head_index``).

        ``loss_chunk`` rows at a time: the fp32 logits of a chunk (N x 160k in the paper) exist
        only while its loss is computed and are recomputed in the backward pass, so the loss
        never holds the logits of every target position (a stage I batch has ~16k of them)."""
        chunk = self.loss_chunk
        if chunk <= 0 or len(h) <= chunk:
            return F.cross_entropy(self._heads(h, heads).float(), targets)

        def summed(h_chunk, t_chunk, heads_chunk):
            return F.cross_entropy(self._heads(h_chunk, heads_chunk).float(), t_chunk, reduction="sum")

        recompute = torch.is_grad_enabled()
        total = 0
        for i in range(0, len(h), chunk):
            args = (h[i : i + chunk], targets[i : i + chunk], None if heads is None else heads[i : i + chunk])
            total = total + (checkpoint(summed, *args, use_reentrant=False) if recompute else summed(*args))
        return total / len(h)

    def _heads(self, h: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the multimodal vocabulary: the LLM's head, then the vision head (at the
        positions ``heads`` marks, with ``h``'s leading shape: that grid's head; -1: the shared one).
        Every head runs, on no rows if need be: under ZeRO-3 each rank gathers the same weights."""
        text = self.llm.lm_head(h)
        if heads is None:
            return torch.cat([text, self.vision_head(h)], dim=-1)
        visual = h.new_empty(*h.shape[:-1], self.vocab.visual_size)
        for index, head in enumerate([self.vision_head, *self.grid_heads.values()]):
            rows = heads == index - 1
            visual[rows] = head(h[rows])
        return torch.cat([text, visual], dim=-1)

    def _grid_head_index(self, image_grid: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) each row's place in ``config.grid_heads`` by its ``image_grid`` (-1: none, the
        shared vision head); None for a model without grid heads or rows without a grid."""
        if self.grid_heads is None or image_grid is None:
            return None
        index = {grid: i for i, grid in enumerate(self.config.grid_heads)}
        return torch.tensor([index.get(grid_name(*grid), -1) for grid in image_grid.tolist()], device=image_grid.device)

    def _layer(self, i, h, router: Router, cos, sin, mask, is_causal, cache, B, L) -> torch.Tensor:
        """One decoder layer on the residual stream h (B*L rows, in the router's expert order)."""
        text = self.llm.model.layers[i]
        attn = text.self_attn
        if self.experts is not None:
            visual = self.experts[i]
        else:  # the ablation: visual tokens through the same (trainable) modules
            visual = SimpleNamespace(q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, o_proj=attn.o_proj, mlp=text.mlp)

        def heads(proj_text, proj_visual, x, n):  # routed projection -> (B, n, L, head_dim)
            y = router.to_sequence_order(router.apply(proj_text, proj_visual, x))
            return y.view(B, L, n, self.head_dim).transpose(1, 2)

        x = text.input_layernorm(h)
        q = apply_rotary(heads(attn.q_proj, visual.q_proj, x, self.num_heads), cos, sin)
        k = apply_rotary(heads(attn.k_proj, visual.k_proj, x, self.num_kv_heads), cos, sin)
        v = heads(attn.v_proj, visual.v_proj, x, self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(i, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        y = router.to_expert_order(y.transpose(1, 2).reshape(B * L, -1))
        h = h + router.apply(attn.o_proj, visual.o_proj, y)
        h = h + router.apply(text.mlp, visual.mlp, text.post_attention_layernorm(h))
        return h

    def _image_position_embeddings(
        self, input_ids: torch.Tensor, visual: torch.Tensor, cache: KVCache | None, image_grid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, hidden): the learned embeddings of where each visual token sits in its image,
        zero elsewhere. Why: rotary positions are relative and prompts differ in length, so
        without them a code would have to find out where in the grid it is through attention,
        which small models learn slowly (docs/LOG.md).

        ``image_positions``: its offset from the last ``<image_start>`` (0 for the start itself).
        ``grid_features``: its row (row ends before it) and column (tokens since the last row end
        or ``<image_start>``; a row end sits in the column after its row's last code), read from
        the ids, as the centre of its cell in fractions of the grid (``image_grid``: rows,
        columns), ``(row + 0.5) / rows`` and ``(column + 0.5) / columns``, in sines and cosines
        of ``grid_features`` frequencies, projected. With offsets alone the code under a code is
        5 tokens back in a 64x64 grid and 9 in a 128x64 one; in fractions a place in a 96x64
        grid is near the same place in a 64x64 one, as in a scene of the world, whose positions
        are fractions of the canvas (issue 17, docs/LOG.md).
        The cache carries the last token's place into the next decoding step."""
        B, L = input_ids.shape
        device = input_ids.device
        index = torch.arange(L, device=device).expand(B, L)
        starts = input_ids == self.vocab.image_start
        last_start = torch.where(starts, index, -1).cummax(dim=1).values
        before = cache.image_offset[:, None] if cache is not None else torch.full((B, 1), -1, device=device)
        offset = torch.where(last_start >= 0, index - last_start, torch.where(before >= 0, before + 1 + index, -1))
        zero = torch.zeros((), dtype=self.visual_embed.weight.dtype, device=device)
        out = zero.expand(B, L, self.visual_embed.embedding_dim)
        if self.image_position is not None:
            placed = visual & (offset >= 0)
            if bool((offset[placed] >= self.config.image_positions).any()):
                raise ValueError(f"an image longer than image_positions={self.config.image_positions} tokens")
            # text after an image (a caption) has offsets too, possibly past the table: look up 0 there
            out = out + torch.where(placed.unsqueeze(-1), self.image_position(torch.where(placed, offset, 0)), zero)
        if self.grid_projection is not None:
            ends = (input_ids == self.vocab.image_row_end) & (offset >= 0)
            boundary = starts | ends
            last_boundary = torch.where(boundary, index, -1).cummax(dim=1).values  # inclusive
            prior = torch.cat([last_boundary.new_full((B, 1), -1), last_boundary[:, :-1]], dim=1)  # exclusive
            cached_boundary = cache.image_boundary[:, None] if cache is not None else torch.zeros((B, 1), dtype=torch.long, device=device)
            column = torch.where(prior >= 0, index - prior - 1, offset - 1 - cached_boundary)
            ends_before = ends.long().cumsum(1) - ends.long()
            ends_at_start = ends_before.gather(1, last_start.clamp(min=0))
            cached_rows = cache.image_rows[:, None] if cache is not None else torch.zeros((B, 1), dtype=torch.long, device=device)
            row = torch.where(last_start >= 0, ends_before - ends_at_start, cached_rows + ends_before)
            placed = visual & (offset >= 1)
            if image_grid is None and bool(placed.any()):
                raise ValueError("this model places codes by grid_features: pass image_grid=(rows, columns) of each row's image")
            if image_grid is not None:  # (B, 2): forward's, or the cache's
                fraction = torch.stack([(row + 0.5) / image_grid[:, :1], (column + 0.5) / image_grid[:, 1:]], dim=-1)
                k = torch.arange(1, self.config.grid_features + 1, device=device, dtype=torch.float32)
                angles = (torch.pi * fraction.unsqueeze(-1) * k).flatten(-2)  # (B, L, 2F)
                features = torch.cat([angles.sin(), angles.cos()], dim=-1).to(zero.dtype)
                out = out + torch.where(placed.unsqueeze(-1), self.grid_projection(features), zero)
            if cache is not None:
                cache.image_rows = row[:, -1] + ends[:, -1].long()
                last = last_boundary[:, -1]
                cache.image_boundary = torch.where(last >= 0, offset[:, -1] - (L - 1 - last), cache.image_boundary)
        if cache is not None:
            cache.image_offset = offset[:, -1].clone()
        return out

    def _training_rows(self, visual: torch.Tensor, attention_mask: torch.Tensor | None, past: int):
        """(frozen, skip) marks for the router while training (else None): text rows whose states
        depend on frozen weights only (no image token before them; None when the text weights
        are trained) and padding rows, which nothing reads."""
        if not torch.is_grad_enabled() or past:
            return None, None
        real = None if attention_mask is None else attention_mask.bool()  # no cache: (B, L) like visual
        skip = None if real is None else ~real.flatten()
        if self.experts is None or any(p.requires_grad for p in self.llm.parameters()):
            return None, skip
        real_visual = visual if real is None else visual & real
        images_before = real_visual.cumsum(1) - real_visual.long()
        return (~visual & (images_before == 0)).flatten(), skip

    @staticmethod
    def _attention_mask(attention_mask, L, past, device, dtype) -> tuple[torch.Tensor | None, bool]:
        """(additive mask (B|1, 1, L, past+L) of ``dtype``, 0 or -inf, or None; is_causal) for SDPA.

        Additive, not boolean: SDPA turns a boolean mask into this one in every layer (on CPU a
        4-query pass over 600 cached keys took 75 us with a boolean mask, 58 with this one);
        made here, it is made once per forward, with the same values."""
        if attention_mask is None and past == 0:
            return None, True
        if attention_mask is None and L == 1:
            return None, False  # one new token attends to everything cached
        q_pos = torch.arange(past, past + L, device=device)[:, None]
        k_pos = torch.arange(past + L, device=device)[None, :]
        allowed = k_pos <= q_pos
        if attention_mask is not None:
            # a padding query may attend itself, so that no row of the mask is empty
            allowed = (allowed & attention_mask[:, None, : past + L].bool()) | (k_pos == q_pos)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        return mask.unsqueeze(-3), False

    # ---------------------------------------------------------------------------- generate
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None, **options
    ) -> torch.Tensor:
        """Continue prompts with the KV cache, greedy by default; the new tokens (B, n).

        Prompts of different lengths are left-padded with ``attention_mask`` zeros. ``options``
        are those of ``mars_semvie.sampling.generate``, the one sampling path: ``allowed_ids``
        (default: every real id; e.g. ``vocab.code_ids`` for images), ``temperature``, ``top_k``,
        ``top_p``, ``cfg_scale`` with ``uncond_ids``, ``forced``, ``eos_id``, ``generator``,
        ``kv_cache``.
        """
        return sampling.generate(self, input_ids, max_new_tokens, attention_mask, **options)

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_dir: str | Path, llm_path: str | None = None) -> None:
        """Write ``semvie_config.json`` and ``semvie.safetensors`` (SemVIE's own weights).

        The LLM's weights are not duplicated when they are frozen: the config records
        ``llm_path``, by default the directory the LLM was loaded from (``llm.name_or_path``).
        When the LLM was not loaded from a directory, or its weights are trained
        (``visual_expert=False``), it is written to ``save_dir/llm`` with ``save_pretrained``.
        """
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.visual_expert and llm_path is not None:
            raise ValueError("visual_expert=False trains the LLM's weights: they must be saved, not referenced")
        source = Path(self.llm.name_or_path or "")
        if llm_path is None and self.config.visual_expert and self.llm.name_or_path and source.is_dir():
            llm_path = str(source.resolve())
        if llm_path is None:
            self.llm.save_pretrained(save_dir / LLM_DIR)
            llm_path = LLM_DIR
        own = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(own, save_dir / WEIGHTS_NAME)
        (save_dir / CONFIG_NAME).write_text(json.dumps({**asdict(self.config), "llm_path": llm_path}, indent=2))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, llm_path: str | None = None, dtype: torch.dtype | None = None
    ) -> SemVIEForCausalLM:
        """Load a ``save_pretrained`` directory; ``llm_path`` overrides where the LLM is read from."""
        path = Path(path)
        meta = json.loads((path / CONFIG_NAME).read_text())
        stored_llm_path = meta.pop("llm_path")
        llm_dir = Path(llm_path or stored_llm_path)
        if not llm_dir.is_absolute() and not llm_path:
            llm_dir = path / llm_dir
        if not llm_dir.is_dir():
            raise FileNotFoundError(
                f"the text LLM {llm_dir} ({'llm_path' if llm_path else 'recorded in ' + str(path / CONFIG_NAME)}) "
                "is not a directory: pass llm_path=<its directory> if it moved"
            )
        llm = load_llm(llm_dir, dtype=dtype)
        model = cls(llm, SemVIEConfig(**meta))
        try:
            weights = load_file(path / WEIGHTS_NAME)
        except SafetensorError as err:
            raise ValueError(f"{path / WEIGHTS_NAME} is not a readable safetensors file (truncated or corrupt?): {err}") from None
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise RuntimeError(f"{path / WEIGHTS_NAME}: missing {missing}, unexpected {unexpected}")
        return model


def load_llm(path: str | Path | None = None, config=None, dtype: torch.dtype | None = None) -> nn.Module:
    """A Hugging Face causal LM from a checkpoint directory, or randomly initialised from a config
    (under ``torch.device("meta")`` that allocates nothing: apps/inspect_model.py)."""
    from transformers import AutoModelForCausalLM

    if (path is None) == (config is None):
        raise ValueError("load_llm needs exactly one of path and config")
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)

