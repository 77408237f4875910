"""Decoding the high-resolution span with K heads, on the KV cache, guidance in one batch.

``decode(model, input_ids, slots, tokens_per_step=K, mode=...)`` continues prompts built by
``SuperResModel.prompt_ids`` over the image slots of ``mars_semvie.sequences.image_slots``
(``None``: a code is drawn; an id: the layout places it, e.g. ``<image_row_end>``).

- **fast**: every forward pass feeds the K tokens of the previous step and reads K new ones,
  head k giving the token k - 1 after head 1's, each drawn from its own head: ceil(N/K)
  passes for N slots (the prompt's pass included). Not the model's distribution: adjacent
  tokens are drawn independently (PAR, arXiv 2412.15119).
- **exact** (self-speculative, arXiv 2404.19737 / 2410.01699): head 1 draws the next token c,
  heads 2..K draft the K - 1 after it; the next pass feeds c and the drafts, and head 1 at each
  fed position verifies the draft after it. Greedy: a draft is kept while it equals head 1's
  argmax, so the output is K=1 greedy decoding token for token. Sampling: draft d from q is
  kept with probability min(1, p(d)/q(d)); at the first rejection the token is drawn from
  normalise(max(p - q, 0)); when every draft is kept head 1's last distribution gives the
  next c. The output then has exactly the distribution of head-1 sampling. p and q are the
  guided, tempered, top-k / top-p filtered distributions over codes (the same transformation
  for both). The cache keeps the kept tokens and drops the rest (``length`` set back).
- **Rows share the decision.** A guided batch is 2B rows (conditional first, then
  unconditional, ``mars_semvie.sampling``), fed the same tokens. The B rows of a batch keep the
  same number of drafts, the smallest any row kept: a row that kept more takes its kept draft
  at the first position beyond (a draw from p given its prefix), a row that rejected there its
  residual draw. Whether a position is used depends only on decisions before it, so each row
  still gets exactly head-1 sampling; more rows mean fewer kept drafts per pass (measured on a
  tiny trained model, K=4: 2.98 tokens per pass for one row, 1.28 for 40 rows: docs/LOG.md).
- Head 1 here is the vision head restricted to the image slot's ids (codes): the same
  distribution as SemVIE's full multimodal softmax restricted to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from mars_semvie.sampling import Generators, _stack_left_padded, filter_logits, guide

MODES = ("fast", "exact")


@dataclass
class DecodeStats:
    forward_passes: int = 0
    tokens: int = 0  # tokens written: per row (the slots); summed over images by mars_app.cascade
    accepted: list[int] = field(default_factory=list)  # exact: tokens kept per verifying pass (1 + kept drafts)

    @property
    def mean_accepted_length(self) -> float:
        """Exact mode: mean tokens kept per verifying pass (1 = no draft ever kept); fast: K."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else float("nan")


class Stream:
    """A left-padded batch on the KV cache: feed tokens, take back the last ones fed."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        B, L = input_ids.shape
        self.model = model
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        positions = (
            torch.arange(L, device=input_ids.device).expand(B, L)
            if self.mask is None
            else (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        )
        self.last = positions[:, -1:]
        self.cache = model.semvie.new_cache(B, L + max_new_tokens)
        self.forward_passes = 1
        self.h = model.hidden(input_ids, self.mask, positions, cache=self.cache)[:, -1:]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (rows, n) after everything kept; returns their final hidden states (rows, n, hidden)."""
        n = tokens.shape[1]
        positions = self.last + 1 + torch.arange(n, device=tokens.device)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), n)], dim=1)
        hires = torch.ones_like(tokens, dtype=torch.bool)  # everything fed after the prompt is high-res
        self.h = self.model.hidden(tokens, self.mask, positions, cache=self.cache, hires=hires)
        self.last = positions[:, -1:]
        self.forward_passes += 1
        return self.h

    def drop(self, n: int) -> None:
        """Forget the last n tokens fed (rejected drafts): later tokens overwrite their cache rows."""
        if n == 0:
            return
        self.cache.length -= n
        if self.model.semvie.image_position is not None:  # the offset of the last kept token
            self.cache.image_offset = self.cache.image_offset - n
        if self.mask is not None:
            self.mask = self.mask[:, :-n]
        self.last = self.last - n


class Policy:
    """Head logits -> guided, filtered scores over an image slot's codes, and draws from them."""

    def __init__(self, model, batch: int, cfg_scale, temperature, top_k, top_p, generator: Generators, device):
        vocab = model.vocab
        self.T = vocab.text_size
        self.codes = slice(vocab.code_offset - self.T, vocab.special_offset - self.T)  # in visual-row indices
        self.batch = batch
        self.cfg_scale, self.temperature, self.top_k, self.top_p = cfg_scale, temperature, top_k, top_p
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} rows")
        self.generator = generator
        self.device = device

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, ..., visual_size) -> (B, ..., codes): guidance, code restriction, temperature, filters."""
        logits = guide(logits, self.cfg_scale) if self.cfg_scale != 1 else logits.float()
        logits = logits[..., self.codes]
        if self.greedy:
            return logits
        shape = logits.shape
        flat = filter_logits(logits.reshape(-1, shape[-1]) / self.temperature, self.top_k, self.top_p)
        return flat.view(shape)

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.softmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One code index per row and trailing position: probs (B, ..., C) -> (B, ...)."""
        shape = probs.shape[:-1]
        flat = probs.reshape(self.batch, -1, probs.shape[-1])
        if self.generator is None or isinstance(self.generator, torch.Generator):
            out = torch.multinomial(flat.flatten(0, 1), 1, generator=self.generator).view(self.batch, -1)
        else:
            out = torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(flat, self.generator)])
        return out.view(shape)

    def uniform(self, n: int) -> torch.Tensor:
        """(B, n) uniform draws in [0, 1)."""
        if self.generator is None or isinstance(self.generator, torch.Generator):
            return torch.rand(self.batch, n, generator=self.generator, device=self.device)
        return torch.stack([torch.rand(n, generator=g, device=self.device) for g in self.generator])

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """A code index per row from scores (B, C) (argmax when greedy)."""
        return scores.argmax(-1) if self.greedy else self.draw(self.probs(scores))

    def to_ids(self, index: torch.Tensor) -> torch.Tensor:
        return index + self.codes.start + self.T


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    slots: Sequence[int | None],
    attention_mask: torch.Tensor | None = None,
    *,
    tokens_per_step: int = 1,
    mode: str = "exact",
    uncond_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
) -> tuple[torch.Tensor, DecodeStats]:
    """The high-res tokens (B, len(slots)) after B left-padded prompts, and how they were made."""
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    K = tokens_per_step
    if not 1 <= K <= model.num_heads:
        raise ValueError(f"tokens_per_step={K}: this model was trained with {model.num_heads} heads (1..{model.num_heads})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, N = len(input_ids), len(slots)
    guided = cfg_scale != 1
    if guided:
        if uncond_ids is None or len(uncond_ids) != B:
            raise ValueError(f"cfg_scale={cfg_scale} needs {B} unconditional prompts (uncond_ids)")
        input_ids, attention_mask = _stack_left_padded(input_ids, attention_mask, uncond_ids, uncond_attention_mask, model.vocab.pad)
    policy = Policy(model, B, cfg_scale, temperature, top_k, top_p, generator, input_ids.device)
    stream = Stream(model, input_ids, attention_mask, N)
    run = _fast if mode == "fast" or K == 1 else _exact
    tokens, stats = run(model, stream, policy, list(slots), K, guided)
    stats.forward_passes = stream.forward_passes
    stats.tokens = N
    return tokens, stats


def _forced(slot: int | None, B: int, device) -> torch.Tensor:
    return torch.full((B,), slot, dtype=torch.long, device=device)


def _both(tokens: torch.Tensor, guided: bool) -> torch.Tensor:
    """The tokens fed to the conditional and (guided) the unconditional rows."""
    return torch.cat([tokens, tokens]) if guided else tokens


def _fast(model, stream: Stream, policy: Policy, slots: list, K: int, guided: bool):
    """K tokens per pass, each from its own head at the last position (K=1: plain decoding)."""
    B, N, device = policy.batch, len(slots), stream.h.device
    out, sizes = [], []
    while True:
        n = min(K, N - len(out))
        sizes.append(n)
        scores = policy.scores(model.visual_logits(stream.h[:, -1], n))  # (B, n, C)
        drawn = policy.to_ids(scores.argmax(-1) if policy.greedy else policy.draw(policy.probs(scores)))
        step = [
            _forced(slots[len(out) + j], B, device) if slots[len(out) + j] is not None else drawn[:, j]
            for j in range(n)
        ]
        out += step
        if len(out) == N:
            break
        stream.feed(_both(torch.stack(step, dim=1), guided))
    return torch.stack(out, dim=1), DecodeStats(accepted=sizes)


def _exact(model, stream: Stream, policy: Policy, slots: list, K: int, guided: bool):
    """Head 1 draws, heads 2..K draft, head 1 verifies in the next pass (module docstring)."""
    B, N, device = policy.batch, len(slots), stream.h.device
    stats = DecodeStats()
    out: list[torch.Tensor] = []

    def propose(h: torch.Tensor, first: torch.Tensor | None):
        """(c, drafts (B, n), their q (B, n, C) or None) at the position whose state is h (rows, hidden).
        ``first``: c already decided (a kept draft or a residual draw), else drawn from head 1."""
        pos = len(out)
        n = min(K - 1, N - pos - 1)
        logits = model.visual_logits(h, n + 1)
        scores = policy.scores(logits)  # (B, n + 1, C)
        if first is None:
            first = _forced(slots[pos], B, device) if slots[pos] is not None else policy.to_ids(policy.pick(scores[:, 0]))
        drafts, q = [], []
        for j in range(1, n + 1):
            slot = slots[pos + j]
            if slot is not None:
                drafts.append(_forced(slot, B, device))
                q.append(None)
                continue
            s = scores[:, j]
            drafts.append(policy.to_ids(policy.pick(s)))
            q.append(None if policy.greedy else policy.probs(s))
        return first, drafts, q

    c, drafts, q = propose(stream.h[:, -1], None)
    while True:
        out.append(c)
        if len(out) == N:
            break
        n = len(drafts)
        h = stream.feed(_both(torch.stack([c, *drafts], dim=1), guided))  # (rows, 1 + n, hidden)
        p_scores = policy.scores(model.visual_logits(h, 1)[..., 0, :])  # (B, 1 + n, C): head 1 after each fed token
        keep = torch.ones(B, n, dtype=torch.bool, device=device)
        residual = [None] * n
        u = None if policy.greedy else policy.uniform(n)
        for j in range(n):
            if slots[len(out) + j] is not None:
                continue  # placed: p and q are the same point mass
            index = drafts[j] - policy.codes.start - policy.T
            if policy.greedy:
                keep[:, j] = p_scores[:, j].argmax(-1) == index
                continue
            p = policy.probs(p_scores[:, j])
            p_d = p.gather(1, index[:, None]).squeeze(1)
            q_d = q[j].gather(1, index[:, None]).squeeze(1)
            keep[:, j] = u[:, j] * q_d < p_d  # u < p/q, without dividing by a tiny q
            rest = (p - q[j]).clamp(min=0)
            residual[j] = rest / rest.sum(-1, keepdim=True).clamp(min=1e-12)
        kept = int(keep.long().cumprod(1).sum(1).min()) if n else 0  # drafts every row keeps
        out += drafts[:kept]
        stats.accepted.append(1 + kept)
        stream.drop(n - kept)
        if len(out) == N:
            break
        # the token after the kept ones: a row's own kept draft, its residual draw, or (every
        # draft kept) a draw from head 1 after the last one
        if kept < n:
            j = kept
            if slots[len(out)] is not None or policy.greedy:
                nxt = drafts[j] if slots[len(out)] is not None else policy.to_ids(p_scores[:, j].argmax(-1))
            else:
                nxt = torch.where(keep[:, j], drafts[j], policy.to_ids(policy.draw(residual[j])))
        else:
            nxt = None
        c, drafts, q = propose(h[:, kept], nxt)
    return torch.stack(out, dim=1), stats
