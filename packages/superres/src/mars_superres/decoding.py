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
  for both).
- **Each row keeps its own drafts.** Rows of a batch accept different numbers of drafts; the
  rejected ones stay in the KV cache as holes (attention mask 0), and each row's positions and
  image offsets continue from its last kept token, so a row decodes as it would alone (up to
  floating-point rounding). Past a row's last slot (a finished row, drafts beyond the end) a
  filler text token is fed and becomes a hole. When the cache fills up it is compacted (holes
  dropped, rows left-padded again). A guided
  batch is 2B rows (conditional first, then unconditional, ``mars_semvie.sampling``): the two
  rows of a prompt are fed the same tokens and share the decision. (Sharing the smallest kept
  count over the batch instead cut the tokens per pass of a tiny trained model at K=4 from
  2.98 for one row to 1.28 for 40 rows: docs/LOG.md.)
- **Aligned hints** (models trained with them, ``SuperResModel`` docstring): every fed token
  carries the hint of the slot after its own, and heads 2..K the hints of their target slots,
  from the slot each row has reached.
- Head 1 here is the vision head restricted to the image slot's ids (codes): the same
  distribution as SemVIE's full multimodal softmax restricted to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mars_semvie.sampling import Generators, _stack_left_padded, filter_logits, guide

MODES = ("fast", "exact")
FILLER = 0  # a text id: what exact decoding feeds where nothing is kept


@dataclass
class DecodeStats:
    forward_passes: int = 0
    tokens: int = 0  # tokens written: per row (the slots); summed over images by mars_app.cascade
    accepted: list[int] = field(default_factory=list)  # exact: per row and verifying pass, 1 + kept drafts; fast: K per pass
    seconds: float = 0.0  # wall-clock of decoding alone (prompt pass included; no VQ, no text); summed by mars_app.cascade

    @property
    def mean_accepted_length(self) -> float:
        """Exact mode: mean tokens a row keeps per verifying pass (1 = no draft ever kept); fast: about K."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else float("nan")


class Stream:
    """A left-padded batch on the KV cache: feed tokens, keep each row's first few of them."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slots: Sequence[int | None]):
        B, L = input_ids.shape
        max_new_tokens = len(slots)
        self.model = model
        row_end = model.vocab.image_row_end
        columns = next((i for i, slot in enumerate(slots) if slot is not None), len(slots))
        hints = model.hints(input_ids, (columns, max(1, sum(slot == row_end for slot in slots))))
        # every slot's hint indices once (the grid is fixed): a pass looks them up with one gather,
        # not LowresHints.index's ~30 small ops per call (one image per pass is op-bound);
        # slots past the end (drafts) are all ``none``, as the table's last row
        self.hint_table = None if hints is None else hints.index(torch.arange(max_new_tokens + 1, device=input_ids.device).expand(B, -1))
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long()
        positions = (
            torch.arange(L, device=input_ids.device).expand(B, L)
            if self.mask is None
            else (self.mask.cumsum(-1) - 1).clamp(min=0)
        )
        self.last = positions[:, -1:]
        # room for the kept tokens and as many holes again before a compaction
        self.cache = model.semvie.new_cache(B, L + 2 * max_new_tokens + 16)
        self.offsets = model.semvie.image_position is not None
        self.forward_passes = 1
        hint = None
        if self.hint_table is not None:  # the prompt's last token is the high-res <image_start> (slot -1): slot 0's hint
            hint = torch.full((B, L, self.hint_table.shape[-1]), -1, dtype=torch.long, device=input_ids.device)
            hint[:, -1] = self.hint_table[:, 0]
        self.h = model.hidden(input_ids, self.mask, positions, cache=self.cache, hint=hint)[:, -1:]

    def hint(self, slots: torch.Tensor) -> torch.Tensor:
        """Hint indices (rows, ..., neighbours) of high-res slots (rows, ...), slots >= 0."""
        table = self.hint_table
        at = slots.clamp(max=table.shape[1] - 1).reshape(len(slots), -1, 1).expand(-1, -1, table.shape[-1])
        return table.gather(1, at).view(*slots.shape, -1)

    def logits(self, h: torch.Tensor, heads: int, slots: torch.Tensor) -> torch.Tensor:
        """``model.visual_logits`` of states h (rows, ..., hidden) at high-res ``slots`` (rows, ...)."""
        hint = None
        if self.hint_table is not None and heads > 1:
            hint = self.hint(slots.unsqueeze(-1) + torch.arange(2, heads + 1, device=slots.device))
        return self.model.visual_logits(h, heads, hint)

    def feed(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Tokens (rows, n) after each row's last kept one, at high-res ``slots`` (rows, n); their
        final hidden states (rows, n, hidden)."""
        n = tokens.shape[1]
        if self.cache.length + n > self.cache.max_length:
            self.compact()
        positions = self.last + 1 + torch.arange(n, device=tokens.device)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), n)], dim=1)
        self.before = (self.last, self.cache.image_offset.clone() if self.offsets else None)
        hires = torch.ones_like(tokens, dtype=torch.bool)  # everything fed after the prompt is high-res
        hint = None if self.hint_table is None else self.hint(slots + 1)
        self.h = self.model.hidden(tokens, self.mask, positions, cache=self.cache, hires=hires, hint=hint)
        self.last = positions[:, -1:]
        self.forward_passes += 1
        return self.h

    def keep(self, kept: torch.Tensor, n: int) -> None:
        """Of the n tokens fed last, row r keeps its first kept[r]; the others become holes."""
        if bool((kept == n).all()):
            return
        last, offset = self.before
        if self.mask is None:
            self.mask = torch.ones(len(kept), self.cache.length, dtype=torch.long, device=kept.device)
        self.mask[:, -n:] = (torch.arange(n, device=kept.device) < kept[:, None]).long()
        self.last = last + kept[:, None]
        if self.offsets:  # the image offset of each row's last kept token
            self.cache.image_offset = offset + kept

    def compact(self) -> None:
        """Drop the holes from the cache; rows with fewer entries are left-padded (mask 0)."""
        length = self.cache.length
        valid = self.mask.bool() if self.mask is not None else torch.ones(len(self.last), length, dtype=torch.bool, device=self.last.device)
        keep = int(valid.sum(1).max())
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, -keep:]  # holes first, entries in order
        for store in (self.cache.keys, self.cache.values):
            for tensor in store:
                index = order[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
                tensor[:, :, :keep] = tensor[:, :, :length].gather(2, index)
        self.cache.length = keep
        self.mask = valid.gather(1, order).long()


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
    start = time.perf_counter()
    policy = Policy(model, B, cfg_scale, temperature, top_k, top_p, generator, input_ids.device)
    stream = Stream(model, input_ids, attention_mask, slots)
    run = _fast if mode == "fast" or K == 1 else _exact
    tokens, stats = run(model, stream, policy, list(slots), K, guided)
    stats.forward_passes = stream.forward_passes
    stats.tokens = N
    if tokens.is_cuda:
        torch.cuda.synchronize(tokens.device)  # the time of the work, not of queueing it
    stats.seconds = time.perf_counter() - start
    return tokens, stats


def _forced(slot: int | None, B: int, device) -> torch.Tensor:
    return torch.full((B,), slot, dtype=torch.long, device=device)


def _both(tokens: torch.Tensor, guided: bool) -> torch.Tensor:
    """The tokens fed to the conditional and (guided) the unconditional rows."""
    return torch.cat([tokens, tokens]) if guided else tokens


def _fast(model, stream: Stream, policy: Policy, slots: list, K: int, guided: bool):
    """K tokens per pass, each from its own head at the last position (K=1: plain decoding)."""
    B, N, device = policy.batch, len(slots), stream.h.device
    rows = len(stream.h)
    out, sizes = [], []
    while True:
        n = min(K, N - len(out))
        sizes.append(n)
        state = torch.full((rows,), len(out) - 1, device=device)  # the slot of the last token fed
        scores = policy.scores(stream.logits(stream.h[:, -1], n, state))  # (B, n, C)
        drawn = policy.to_ids(scores.argmax(-1) if policy.greedy else policy.draw(policy.probs(scores)))
        step = [
            _forced(slots[len(out) + j], B, device) if slots[len(out) + j] is not None else drawn[:, j]
            for j in range(n)
        ]
        out += step
        if len(out) == N:
            break
        stream.feed(_both(torch.stack(step, dim=1), guided), torch.arange(len(out) - n, len(out), device=device).expand(rows, n))
    return torch.stack(out, dim=1), DecodeStats(accepted=sizes)


def _exact(model, stream: Stream, policy: Policy, slots: list, K: int, guided: bool):
    """Head 1 draws, heads 2..K draft, head 1 verifies in the next pass; each row keeps its own
    drafts (module docstring)."""
    B, N, device = policy.batch, len(slots), stream.h.device
    placed = torch.tensor([-1 if slot is None else slot for slot in slots] + [-1] * K, device=device)  # -1: drawn
    rows = torch.arange(B, device=device)
    out = torch.full((B, N + K), -1, dtype=torch.long, device=device)  # K spare columns: drafts past the end
    pos = torch.zeros(B, dtype=torch.long, device=device)  # tokens each row has written
    stats = DecodeStats()

    def place(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Tokens with the layout's ids where the slots ``at`` (same shape) are placed."""
        fixed = placed[at.clamp(max=N + K - 1)]
        return torch.where(fixed >= 0, fixed, tokens)

    def propose(h: torch.Tensor):
        """Drafts (B, K-1) for slots pos+1.. and their q (B, K-1, C) from heads 2..K at states h
        (rows, hidden), those of each row's last token (slot pos - 1)."""
        scores = policy.scores(stream.logits(h, K, _both(pos - 1, guided))[..., 1:, :])  # (B, K-1, C)
        at = pos[:, None] + 1 + torch.arange(K - 1, device=device)
        if policy.greedy:
            return place(policy.to_ids(scores.argmax(-1)), at), None
        q = policy.probs(scores)
        return place(policy.to_ids(policy.draw(q)), at), q

    h = stream.h[:, -1]
    c = place(policy.to_ids(policy.pick(policy.scores(stream.logits(h, 1, _both(pos - 1, guided))[:, 0]))), pos)
    drafts, q = propose(h)
    n = K - 1
    while True:
        active = pos < N
        out[rows, pos] = torch.where(active, c, out[rows, pos])
        pos = pos + active.long()
        if not bool((pos < N).any()):
            break
        fed = torch.cat([c[:, None], drafts], dim=1)
        # past a row's last slot (a finished row, drafts past the end) a text token fills the
        # block: it becomes a hole, and as a text token it takes no image offset beyond the table
        fed_at = pos[:, None] - 1 + torch.arange(1 + n, device=device)
        beyond = ~active[:, None] | (fed_at >= N)
        fed_slots = _both(fed_at, guided)
        h = stream.feed(_both(fed.masked_fill(beyond, FILLER), guided), fed_slots)  # (rows, 1 + n, hidden)
        p_scores = policy.scores(stream.logits(h, 1, fed_slots)[..., 0, :])  # (B, 1 + n, C): head 1 after each fed token
        at = pos[:, None] + torch.arange(n, device=device)  # the drafts' slots
        index = drafts - policy.codes.start - policy.T  # code index (placed ids fall outside, unused)
        fixed = placed[at.clamp(max=N + K - 1)] >= 0
        if policy.greedy:
            keep = p_scores[:, :n].argmax(-1) == index
        else:
            p = policy.probs(p_scores[:, :n])  # (B, n, C)
            safe = index.clamp(0, p.shape[-1] - 1)[..., None]
            keep = policy.uniform(n) * q.gather(2, safe)[..., 0] < p.gather(2, safe)[..., 0]  # u < p/q without dividing
        keep = (keep | fixed) & (at < N)
        kept = keep.long().cumprod(1).sum(1) * active  # drafts each row keeps (none for a finished row)
        at = at.clamp(max=N + K - 1)  # write the kept drafts (past the end: unwritten spare columns)
        out.scatter_(1, at, torch.where(torch.arange(n, device=device) < kept[:, None], drafts, out.gather(1, at)))
        stats.accepted += (1 + kept[active]).tolist()
        stream.keep(_both(active.long() * (1 + kept), guided), 1 + n)
        pos = pos + kept
        # the next token: head 1 after each row's last kept token; at a rejected draft, from
        # normalise(max(p - q, 0)) (greedy: the argmax either way)
        last = kept  # fed position of the last kept token (c is position 0)
        p_next = p_scores[rows, last]  # (B, C)
        if policy.greedy:
            c = policy.to_ids(p_next.argmax(-1))
        else:
            p = policy.probs(p_next)
            rejected = last < n
            q_next = q[rows, last.clamp(max=n - 1)] if n else p
            rest = (p - q_next).clamp(min=0)
            rest = rest / rest.sum(-1, keepdim=True).clamp(min=1e-12)
            c = policy.to_ids(policy.draw(torch.where(rejected[:, None], rest, p)))
        c = place(c, pos)
        drafts, q = propose(stream.h[torch.cat([rows, rows + B]) if guided else rows, _both(last, guided)])
    return out[:, :N], stats
