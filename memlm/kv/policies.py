"""Per-sequence KV eviction policies: which cached tokens a sequence keeps.

Owns: `KVPolicySpec` (a request's policy and its sizes, validated: one clear error per bad
parameter), `KVPolicyState` (what a policy reads of one sequence: the text position of each
cache entry and, for `h2o` / `snap`, its accumulated attention mass), `plan_eviction` (given
that state and the tokens about to arrive, the cache entries to keep, or None) and
`plan_relief` (the same under pool pressure: down to the low end of the policy's range) and
`compaction_moves` (how to pack the kept entries into the front of the cache so the tail
blocks can go back to the pool); `plan_block_eviction` / `plan_block_relief` (the same for a
block KV codec: which whole blocks to drop).
Does not know: blocks or slots (`manager.py` drops the freed tail blocks; the scheduler turns
entries into slots), tensors behind the cache (`engine/runner.py` copies the moved entries), or
when to call it (`engine/scheduler.py`).

Policies (B = the cache budget in tokens; a cache never holds more than B entries):
    full     keep everything (today's behaviour; the model's context is the limit)
    window   the last W tokens                                 B = W
    sinks    the first S tokens + the last W (StreamingLLM)   B = S + W
    h2o      S sinks + the last W + heavy hitters by accumulated attention mass, B given
    snap     once, when the prompt is longer than B: S sinks + the last W prompt tokens (the
             observation window) + the prompt tokens those queries attended to most
             (SnapKV); generation then appends without eviction

Block codecs (int4 / int2 KIVI: keys quantized per channel over a whole block) cannot lose
single tokens, so with them `window`, `h2o` and `snap` evict whole blocks
(`plan_block_eviction`): full blocks leave the block table (window: the oldest; h2o / snap:
the least attention mass outside the sinks' block and the recent window), nothing moves, and
the partial last block (fp16, in `window.py`'s stages) always stays. A KIVI group is never
split. `sinks` stays token-granular: its sink keys are re-rotated in place as the window
slides, which a block codec's codes cannot take.

    table [b3: t0..t15][b8: t16..t31][b1: t32..t40 .]  window 32, 1 token arriving
    drop block 0 of the table (b3)  ->  [b8: t16..t31][b1: t32..t41]; b3 back to the pool

Entries are evicted `stride` (a block) at a time, so a step rarely evicts: the recent window
holds between W - stride + 1 and W tokens. When the pool is short, `plan_relief` evicts a
sequence down to the low end of that range (snap: back to its budget) before anyone is preempted. Kept entries are packed without keeping text order
(attention over a set of keys does not depend on their order; each key carries its own RoPE
rotation), so evicting k entries moves at most k entries:

    cache  [s0 s1 | t5 t6 t7 t8 | t9 t10 t11 t12]  keep s0 s1 t9..t12 (window 4, stride 4)
    moves  t9 -> 2, t10 -> 3, t11 -> 4, t12 -> 5   cache [s0 s1 t9 t10 t11 t12]; last block freed
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

POLICIES = ("full", "window", "sinks", "h2o", "snap")
PAST_CONTEXT = ("window", "sinks")     # policies whose cache never grows with the text


@dataclass(frozen=True)
class KVPolicySpec:
    """A sequence's policy with its sizes resolved (`resolve` fills the defaults)."""

    policy: str = "full"
    window: int = 0            # recent tokens kept (snap: the observation window)
    sinks: int = 0             # first tokens always kept
    budget: int = 0            # most entries the cache holds (0 with `full`: no limit)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown kv_policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy == "full":
            return
        if self.window < 1:
            raise ValueError(f"kv_window must be >= 1 for kv_policy={self.policy}, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"kv_sinks must be >= 0, got {self.sinks}")
        if self.sinks and self.sinks >= self.window:
            raise ValueError(f"kv_sinks ({self.sinks}) must be smaller than kv_window ({self.window})")
        if self.budget < self.sinks + 1:
            raise ValueError(f"kv_budget ({self.budget}) must be at least kv_sinks + 1 "
                             f"({self.sinks + 1}); raise kv_budget or lower kv_sinks")
        if self.policy in ("h2o", "snap") and self.sinks + self.window >= self.budget:
            raise ValueError(f"kv_sinks + kv_window ({self.sinks + self.window}) must be below kv_budget "
                             f"({self.budget}) for {self.policy}: the rest holds the heavy hitters")

    @classmethod
    def resolve(cls, policy: str, window: int | None, sinks: int | None, budget: int | None,
                defaults) -> "KVPolicySpec":
        """The spec of a request: its own fields, else the engine's (`defaults` has kv_window,
        kv_sinks, kv_budget). h2o / snap keep half their budget as the recent window unless
        kv_window is given; `window` has no sinks; window / sinks derive their budget."""
        if policy == "full":
            return cls()
        if policy not in POLICIES:
            cls(policy)            # raises the unknown-policy error
        budget = defaults.kv_budget if budget is None else budget
        if policy == "window":
            w = defaults.kv_window if window is None else window
            return cls("window", w, 0, w)
        s = defaults.kv_sinks if sinks is None else sinks
        if policy == "sinks":
            w = defaults.kv_window if window is None else window
            return cls("sinks", w, s, s + w)
        w = max(1, budget // 2) if window is None else window
        return cls(policy, w, s, budget)

    @property
    def evicts(self) -> bool:
        return self.policy != "full"

    @property
    def past_context(self) -> bool:
        """True when generation may go on past the model's context (the cache stays bounded)."""
        return self.policy in PAST_CONTEXT

    @property
    def needs_mass(self) -> bool:
        return self.policy in ("h2o", "snap")


@dataclass
class KVPolicyState:
    """One sequence's cache as the policy sees it: entry i holds the token at `positions[i]`."""

    spec: KVPolicySpec
    positions: list[int] = field(default_factory=list)   # text position of each cache entry
    mass: torch.Tensor | None = None                     # (>= len(positions),) fp32 attention mass
    snapped: bool = False                                # snap: the prompt was compressed

    @property
    def num_cached(self) -> int:
        return len(self.positions)

    @property
    def num_evicted(self) -> int:
        """Tokens of the text no longer in the cache: positions run 0 .. num_evicted + num_cached - 1."""
        return (self.positions[-1] + 1 - len(self.positions)) if self.positions else 0

    def reset(self) -> None:
        """Forget the cache (the sequence was preempted and will recompute)."""
        self.positions, self.mass, self.snapped = [], None, False

    def append(self, start: int, n: int) -> None:
        """Tokens at text positions start .. start + n - 1 were written after the kept entries."""
        self.positions.extend(range(start, start + n))

    def add_mass(self, values: torch.Tensor) -> None:
        """Accumulate (L,) attention mass over the first L entries (L <= num_cached)."""
        with torch.inference_mode():
            self._add_mass(values)

    def _add_mass(self, values: torch.Tensor) -> None:
        if self.mass is None or self.mass.numel() < values.numel():
            grown = torch.zeros(max(values.numel(), 2 * self.num_cached), dtype=torch.float32)
            if self.mass is not None:
                grown[:self.mass.numel()] = self.mass
            self.mass = grown
        self.mass[:values.numel()] += values.float()

    def drop_blocks(self, blocks: list[int], block_size: int) -> None:
        """Forget the entries of table blocks `blocks` (whole blocks; the rest keep their order)."""
        gone = {b for b in blocks}
        kept = [i for i in range(self.num_cached) if i // block_size not in gone]
        self.positions = [self.positions[i] for i in kept]
        if self.mass is not None:
            with torch.inference_mode():
                idx = torch.tensor([i for i in kept if i < self.mass.numel()], dtype=torch.long)
                mass = torch.zeros_like(self.mass)
                mass[:idx.numel()] = self.mass[idx]
                self.mass = mass

    def apply(self, kept: list[int]) -> None:
        """Keep entries `kept` (sorted), packed as `compaction_moves` packs them."""
        moves = compaction_moves(kept, self.num_cached)
        for src, dst in moves:
            self.positions[dst] = self.positions[src]
        del self.positions[len(kept):]
        if self.mass is not None and moves:
            with torch.inference_mode():      # the runner made `mass` under inference mode
                top = max(src for src, _ in moves) + 1
                if self.mass.numel() < top:           # entries written since the last scoring
                    self.mass = torch.cat([self.mass, self.mass.new_zeros(top - self.mass.numel())])
                src, dst = (torch.tensor(x, dtype=torch.long) for x in zip(*moves))
                self.mass[dst] = self.mass[src]
                self.mass[len(kept):] = 0.0


def plan_eviction(state: KVPolicyState, incoming: int, stride: int, prompt_len: int) -> list[int] | None:
    """Cache entries to keep so that `incoming` more tokens fit the budget, or None (no eviction).

    Args:
        state: the sequence's entries (and mass, for h2o / snap).
        incoming: tokens this step writes after the kept entries.
        stride: extra entries evicted at once so the next steps need no eviction (a block).
        prompt_len: the prompt's length (snap compresses once the prompt is cached).
    Returns:
        Sorted entry indices to keep, or None when everything stays.
    """
    spec, L = state.spec, state.num_cached
    if spec.policy == "full":
        return None
    if spec.policy == "snap":
        if state.snapped or prompt_len <= spec.budget or L < prompt_len:
            return None
        state.snapped = True
        return _heavy_hitters(state, spec.budget)
    if L + incoming <= spec.budget:
        return None
    keep = max(spec.sinks + 1, spec.budget - incoming - (stride - 1))
    keep = min(keep, L)
    if spec.policy == "h2o":
        return _heavy_hitters(state, keep)
    return _sinks_and_recent(state, keep)


def plan_relief(state: KVPolicyState, stride: int, incoming: int = 0) -> list[int] | None:
    """Under pool pressure: the entries to keep at the low end of the policy's own range, or
    None when that would not free a block (`stride` = the block size).

    window / sinks / h2o evict a block at a time: right after an eviction they hold budget -
    stride entries, then grow to the budget; relief evicts down to budget - stride now, so the
    tail block goes back to the pool before the scheduler preempts anyone. snap, whose generation appends past
    its budget after the one-shot compression, is compressed again to its budget by its mass.
    `incoming` tokens this step writes after the kept entries also stay within the budget.
    """
    spec, L = state.spec, state.num_cached
    if spec.policy == "full" or (spec.policy == "snap" and not state.snapped):
        return None
    keep = spec.budget if spec.policy == "snap" else spec.budget - stride
    keep = max(spec.sinks + 1, min(keep, spec.budget - incoming), 1)
    if -(-L // stride) <= -(-keep // stride):
        return None
    if spec.policy in ("h2o", "snap"):
        return _heavy_hitters(state, keep)
    return _sinks_and_recent(state, keep)


BLOCK_POLICIES = ("window", "h2o", "snap")   # what a block KV codec evicts, whole blocks at a time


def plan_block_eviction(state: KVPolicyState, incoming: int, block_size: int,
                        prompt_len: int = 0) -> list[int] | None:
    """A block KV codec's eviction: the table blocks to drop so that `incoming` more tokens fit
    the budget (snap: once, the cached long prompt down to its budget), or None.

    Entries fill the table in text order, so every block but the last is full; the last is
    never dropped, nor (with sinks) block 0, which holds them. `window` drops the oldest blocks;
    h2o / snap first the blocks outside the recent window with the least attention mass, then,
    if that is not enough, the oldest of the recent ones (`engine/eviction.py` sizes windows
    and chunks so the sinks' block and the last always fit)."""
    spec, L = state.spec, state.num_cached
    if spec.policy == "snap":
        if state.snapped or prompt_len <= spec.budget or L < prompt_len:
            return None
        state.snapped = True
        return _block_victims(state, block_size, L - spec.budget)
    if spec.policy not in BLOCK_POLICIES or L + incoming <= spec.budget:
        return None
    return _block_victims(state, block_size, L + incoming - spec.budget)


def plan_block_relief(state: KVPolicyState, block_size: int, incoming: int = 0) -> list[int] | None:
    """Under pool pressure: window / h2o down to at most budget - block_size entries with the
    `incoming` ones (one entry below their usual range when that is what frees a block instead
    of a preemption); snap, once compressed, back to its budget; None when no block would go."""
    spec, L = state.spec, state.num_cached
    if spec.policy not in BLOCK_POLICIES or (spec.policy == "snap" and not state.snapped):
        return None
    low = spec.budget if spec.policy == "snap" else spec.budget - block_size
    return _block_victims(state, block_size, L + incoming - low)


def _block_victims(state: KVPolicyState, bs: int, excess: int) -> list[int] | None:
    """The fewest droppable blocks covering `excess` entries, in the policy's order."""
    spec, L = state.spec, state.num_cached
    if excess <= 0:
        return None
    droppable = range(1 if spec.sinks else 0, min(L // bs, -(-L // bs) - 1))   # full, not the last
    if spec.policy == "window":
        order = list(droppable)
    else:
        recent = {j for j in droppable if (j + 1) * bs > L - spec.window}
        mass = state.mass if state.mass is not None else torch.zeros(0)
        if mass.numel() < L:                         # entries written since the last scoring
            mass = torch.cat([mass, mass.new_zeros(L - mass.numel())])
        score = mass[:(L // bs) * bs].view(-1, bs).sum(1).tolist() if L >= bs else []
        order = sorted((j for j in droppable if j not in recent), key=lambda j: (score[j], j))
        order += sorted(recent)
    picked = sorted(order[:-(-excess // bs)])
    return picked or None


def _by_position(state: KVPolicyState) -> list[int]:
    """Entry indices in text order."""
    return sorted(range(state.num_cached), key=state.positions.__getitem__)


def _sinks_and_recent(state: KVPolicyState, keep: int) -> list[int]:
    order = _by_position(state)
    s = min(state.spec.sinks, keep)
    return sorted(order[:s] + order[len(order) - (keep - s):])


def _heavy_hitters(state: KVPolicyState, keep: int) -> list[int]:
    """S sinks + the last W entries + the rest of `keep` by attention mass (ties: the older)."""
    spec, order = state.spec, _by_position(state)
    s = min(spec.sinks, keep)
    recent = min(spec.window, keep - s)
    fixed = order[:s] + order[len(order) - recent:]
    rest = order[s:len(order) - recent]
    n_heavy = keep - s - recent
    if n_heavy <= 0 or not rest:
        return sorted(fixed)
    if state.mass is None:
        heavy = rest[len(rest) - n_heavy:]
    else:
        mass = state.mass
        if mass.numel() < state.num_cached:          # entries written since the last scoring
            mass = torch.cat([mass, mass.new_zeros(state.num_cached - mass.numel())])
        scores = mass[torch.tensor(rest, dtype=torch.long)]
        top = torch.topk(scores, min(n_heavy, len(rest)), sorted=False).indices.tolist()
        heavy = [rest[i] for i in top]
    return sorted(fixed + heavy)


def compaction_moves(kept: list[int], num_cached: int) -> list[tuple[int, int]]:
    """(source entry, destination entry) pairs that pack `kept` into entries 0 .. len(kept) - 1.

    Kept entries already in front stay; each hole in front takes a kept entry from past the
    front, in order. At most len(kept) moves, usually as many as entries evicted from the front.
    """
    k = len(kept)
    keep = set(kept)
    holes = [i for i in range(k) if i not in keep]
    sources = [i for i in kept if i >= k]
    if len(holes) != len(sources) or (kept and kept[-1] >= num_cached):
        raise ValueError("kept entries must be distinct indices below the cache length")
    return list(zip(sources, holes))
