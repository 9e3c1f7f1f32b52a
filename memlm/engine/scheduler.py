"""Continuous batching: which sequences run this step and how many tokens each.

Owns: the waiting queue and running list (both in arrival order), admission (FCFS while the
step's token budget allows and the free KV blocks cover the running sequences' growth over
their next `admission_headroom` tokens plus the newcomer's whole prompt and headroom; alone, a
newcomer needs only its first chunk; one holding no KV starts at its cached prefix unless it
asks for prompt logprobs, extended by the blocks after it that the prefix cache evicted into a
tier when restoring them pays: `KVOffload.prefix`), chunked prefill mixed with decodes, preemption by
swap or recompute when blocks run out (newest sequence first, so the oldest always progresses:
no starvation; the `KVOffload` swaps it out to a KV tier when that is predicted cheaper than
recomputing, and restores it — or a chat session's saved history — at admission), n > 1 forks
sharing the prompt's full blocks, and finishing (freeing blocks; a session's turn is kept first).
Returns typed `SchedulerOutput`s, which carry each scheduled sequence's block table.
Does not know: which blocks a sequence holds (it asks the `KVCacheManager`, which alone allocates,
shares and frees them), tensors, the model, or text (sequences finish by their `CompletionState`).
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING

from memlm.engine import config as defaults
from memlm.engine.config import SchedulerConfig
from memlm.engine.eviction import PolicyStep, SlotMoves
from memlm.engine.request import Request, RequestStatus, Sequence
from memlm.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from memlm.engine.shared_prefix import SharedPrefixes
from memlm.kv.manager import NO_HIT, KVCacheManager, PrefixHit

if TYPE_CHECKING:                       # the scheduler itself never touches tensors
    from memlm.kv.offload import KVOffload


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, can_share_blocks: bool = True,
                 offload: KVOffload | None = None, policy: PolicyStep | None = None):
        self.config = config
        self.kv = kv
        self.policy = policy or PolicyStep(kv, defaults.EngineConfig())   # evicting KV policies
        self.offload = offload        # swap out / restore through the KV tiers (None: recompute only)
        if offload is not None and kv.cache is not None:
            offload.attach_prefix_cache(kv.cache)     # evicted cached blocks may wait in a tier
        self.num_swaps = 0
        self.max_preemptions_per_seq = 0
        self.can_share = can_share_blocks and config.share_prompt_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.forks: dict[int, list[Sequence]] = {}   # parent seq_id -> siblings waiting on its prompt
        self.num_preemptions = 0
        self.shared = SharedPrefixes(kv)    # prompt blocks running sequences compute now
        self._freed: list[int] = []

    # ---- queue management ----------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(v) for v in self.forks.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.forks)

    def add(self, request: Request) -> None:
        """Queue a request; fails it at once (this request only) if it can never fit."""
        P = len(request.prompt_token_ids)
        try:
            spec = self.policy.attach(request)
        except ValueError as e:
            request.fail(str(e))
            return
        first, *rest = request.sequences
        if P >= self.config.max_model_len and not self.policy.past_context(first):
            request.fail(f"prompt of {P} tokens does not fit the model's {self.config.max_model_len}-"
                         "token context; shorten it, pass truncate_prompt_tokens, or use kv_policy "
                         "sinks / window")
            return
        if self.kv.blocks_for(min(P + 1, spec.budget or P + 1)) > self.kv.num_blocks:
            request.fail(f"prompt of {P} tokens can never fit the KV pool of {self.kv.capacity_tokens} "
                         "tokens; shorten it or raise --memory-budget")
            return
        self.waiting.append(first)
        if rest:
            self.forks[first.seq_id] = rest

    def abort(self, request: Request) -> None:
        """Finish every unfinished completion of `request` as "abort" and free its blocks."""
        self.forks.pop(request.sequences[0].seq_id, None)
        for s in request.sequences:
            if not s.finished:
                s.completion.finish("abort")
                self._finish(s)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. The token budget goes to decodes first, then to prefill:
        running sequences' chunks (oldest first) and FCFS admission of new prompts. While any
        sequence decodes, prefill gets at most `prefill_tokens_with_decodes` tokens (a new prompt
        waits one short step, not one full of others' prefill), and long running chunks leave
        waiting prompts' small first chunks their share. A waiting prompt whose next uncached
        block another running sequence is computing waits for it (`SharedPrefixes`), keeping its
        place in line: newer prompts admitted past it leave it its sequence slot and blocks."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[int] = []
        moves = SlotMoves()
        decodes = sum(1 for s in self.running if s.num_uncomputed_tokens <= 1)
        prefill = self._prefill_budget(budget, decodes)
        long_prefill = prefill - self._small_first_chunks(prefill) \
            if self.waiting and decodes < len(self.running) else prefill
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            want = seq.num_uncomputed_tokens
            chunked = want > 1
            if chunked:
                want = min(want, long_prefill)
                if want <= 0:                   # this step's prefill share is spent: next step
                    i += 1
                    continue
            n = self.policy.chunk(seq, min(want, budget))
            self.policy.shrink(seq, n, moves)        # an evicting policy keeps its budget first
            if self._reserve(seq, n, preempted, moves):
                scheduled.append(self._slice(seq, n))
                budget -= n
                if chunked:
                    prefill -= n
                    long_prefill -= n
                i += 1
            # else `seq` left `running` (preempted or finished); index i is already the next one

        # No admissions in a step that had to preempt: the pool is full, new work would thrash.
        headroom = self._headroom() if self.waiting and not preempted else 0
        pos = 0                                 # waiting[:pos] wait on a shared prefix this step
        while pos < len(self.waiting) and budget > 0 and prefill > 0 \
                and len(self.running) + pos < self.config.max_num_seqs and not preempted:
            seq = self.waiting[pos]
            # A sequence holding no KV starts after its cached prefix (never its last token), or
            # after what a KV tier restores when that covers more than the hot cache does.
            hit = (self.kv.find_cached_prefix(seq, seq.num_tokens)
                   if self._may_use_cache(seq) else NO_HIT)
            if self._may_defer(seq) and self.shared.should_defer(seq, hit):
                # It keeps its place in line: a newer prompt admitted past it leaves it the
                # sequence slot (`pos` above) and the blocks it would take now, else the newer
                # one could hold them for its whole generation while this one waits.
                headroom += self._growth(seq, hit)
                pos += 1
                continue
            restored = self._restorable(seq, hit)
            if restored:
                hit = NO_HIT
            cached = hit.num_blocks * self.kv.block_size
            # Blocks right after the hot hit that the prefix cache evicted into a tier.
            tiered = 0 if restored else self._tiered_blocks(seq, hit)
            extra = tiered * self.kv.block_size
            n = self.policy.chunk(seq, min(seq.num_uncomputed_tokens - cached - extra, budget, prefill))
            # Beside others, the whole rest of the prompt (and its headroom) must fit, not just
            # this chunk: a long prompt admitted on its first chunk is the newest sequence, so it
            # would preempt itself on a later chunk and redo that chunk over and over.
            need = self._growth(seq, hit) if self.running else self.kv.num_blocks_needed(seq, n + extra, hit)
            if self.kv.num_free_blocks - need < headroom or not self.kv.allocate_slots(seq, n + extra, hit):
                seq.num_computed_tokens -= restored
                break
            if tiered:      # a block missing or rejected there is computed instead (the table has room)
                cached += self.kv.block_size * self.offload.prefix.restore(
                    self.kv.prefix_hashes(seq, hit.num_blocks + tiered)[hit.num_blocks:],
                    seq.token_ids_slice(cached, cached + extra),
                    self.kv.block_table(seq)[hit.num_blocks:hit.num_blocks + tiered])
            seq.num_computed_tokens += cached
            if seq.index == 0 and seq.request.num_cached_tokens is None:
                # what its first admission found cached (hot, or restored from the prefix tier)
                seq.request.num_cached_tokens = cached
            if restored and not self.offload.restore(seq, self.kv.block_table(seq)):
                seq.num_computed_tokens = 0     # the entry was lost: compute it (the table covers it)
            del self.waiting[pos]
            seq.status = RequestStatus.RUNNING
            self._insert_running(seq)
            if _keeps_all_kv(seq):
                self.shared.admitted(seq, seq.num_computed_tokens // self.kv.block_size)
            scheduled.append(self._slice(seq, n))
            budget -= n
            prefill -= n
            headroom += self._growth(seq)

        freed, self._freed = self._freed, []
        return SchedulerOutput(scheduled, preempted, freed, moves)

    def _prefill_budget(self, budget: int, decodes: int) -> int:
        """Prefill tokens this step: what the decodes leave, capped while any sequence decodes
        (at `prefill_tokens_with_decodes`, or `PREFILL_TOKENS_PER_DECODE` per decoding sequence
        when that is more: a big decode batch already makes a long step, and the prompts
        waiting behind it are many)."""
        cap = self.config.prefill_tokens_with_decodes
        if not decodes or not cap:
            return budget - decodes
        return min(budget - decodes, max(cap, defaults.PREFILL_TOKENS_PER_DECODE * decodes))

    def _small_first_chunks(self, prefill: int) -> int:
        """Prefill tokens kept from long running chunks for waiting prompts whose uncached rest
        is small (a chat turn after a cached history), at most half of `prefill`."""
        keep, limit = 0, prefill // 2
        room = self.config.max_num_seqs - len(self.running)
        for seq in itertools.islice(self.waiting, max(0, room)):
            hit = (self.kv.find_cached_prefix(seq, seq.num_tokens)
                   if self._may_use_cache(seq) else NO_HIT)
            if self._may_defer(seq) and self.shared.waits_on_owner(seq, hit):
                continue                        # it waits for a shared prefix: no chunk now
            rest = seq.num_uncomputed_tokens - hit.num_blocks * self.kv.block_size
            if rest <= defaults.SMALL_FIRST_CHUNK_TOKENS:
                keep += rest
            if keep >= limit:
                return limit
        return keep

    def _may_defer(self, seq: Sequence) -> bool:
        """Only a fresh prompt (no KV, no saved session or swapped-out KV to restore) may wait
        for a shared prefix another sequence is computing."""
        return (seq.num_computed_tokens == 0 and seq.num_preemptions == 0 and seq.request.session_id is None
                and _keeps_all_kv(seq) and self._may_use_cache(seq) and not self.kv.block_table(seq))

    def _growth(self, seq: Sequence, hit: PrefixHit = NO_HIT) -> int:
        """Blocks `seq` needs for the rest of its prompt (after the cached prefix `hit`) and its
        next `admission_headroom` tokens (fewer if its max_tokens ends sooner)."""
        h = self.config.admission_headroom
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None:
            h = max(0, min(h, max_tokens - seq.num_output_tokens))
        rest = seq.num_uncomputed_tokens - hit.num_blocks * self.kv.block_size
        return self.kv.num_blocks_needed(seq, self.policy.cache_tokens(seq, rest + h), hit)

    @staticmethod
    def _may_use_cache(seq: Sequence) -> bool:
        """Prompt-logprob requests compute their whole prompt (each position's logits are asked
        for); everything else may start at its cached prefix."""
        return not seq.request.needs_prompt_logprobs and _keeps_all_kv(seq)

    def _headroom(self) -> int:
        """Free blocks that admission leaves to the running sequences' near-term growth, so that
        a newly admitted prompt does not force a preemption (a full recompute) a few steps later."""
        return sum(self._growth(s) for s in self.running) if self.config.admission_headroom else 0

    def _reserve(self, seq: Sequence, n: int, preempted: list[int], moves: SlotMoves) -> bool:
        """Blocks for `n` more tokens of a running sequence, preempting the newest if needed
        (after an evicting sequence not yet scheduled this step can give blocks back instead).

        Returns False when `seq` itself had to go (preempted, or finished "length" when it is
        alone and the whole pool is still too small for it).
        """
        while not self.kv.allocate_slots(seq, n):
            if self.policy.relieve(self.running[self.running.index(seq):], seq, n, moves):
                continue
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                seq.completion.finish("length")      # the pool is this sequence's context limit
                self._finish(seq)
                return False
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def _insert_running(self, seq: Sequence) -> None:
        """Keep `running` in arrival order, so a readmitted (preempted) sequence keeps its age:
        it is scheduled before newer ones and is never the next victim while they run."""
        pos = len(self.running)
        while pos > 0 and _age(self.running[pos - 1]) > _age(seq):
            pos -= 1
        self.running.insert(pos, seq)

    def _restorable(self, seq: Sequence, hit: PrefixHit = NO_HIT) -> int:
        """For a sequence that holds no KV: tokens a tier restores at admission (a swapped-out
        sequence, or a chat session's saved history), set as computed until admission fails;
        0 when the prefix cache's `hit` already covers all of their full blocks (no copy)."""
        if self.offload is None or seq.num_computed_tokens or self.kv.block_table(seq) \
                or seq.kv_state is not None:        # an evicting cache is recomputed, not restored
            return 0
        tokens = self.offload.restorable_tokens(seq, hit.num_blocks * self.kv.block_size)
        if tokens and hit.num_blocks >= tokens // self.kv.block_size:
            self.offload.discard(seq)       # the hot pool still holds it: no copy needed
            tokens = 0
        seq.num_computed_tokens = tokens
        return tokens

    def _tiered_blocks(self, seq: Sequence, hit: PrefixHit) -> int:
        """Blocks after the hot prefix `hit` that a tier holds (evicted from the prefix cache)
        and restoring pays for; never the block of the last token (its logits are needed)."""
        if self.offload is None or self.offload.prefix is None or not hit.num_queried_tokens:
            return 0
        limit = (seq.num_tokens - 1) // self.kv.block_size
        if limit <= hit.num_blocks:
            return 0
        return self.offload.prefix.available(self.kv.prefix_hashes(seq, limit), hit.num_blocks)

    def _slice(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, n, seq.token_ids_slice(start, start + n),
                            self.kv.block_table(seq), self.kv.num_cached_tokens(seq))

    def _preempt(self, seq: Sequence) -> None:
        """Take the sequence's blocks back; when readmitted (first in line) it restores its KV from
        a tier if the offload swapped it out (chosen by cost), else recomputes prompt + output."""
        self.running.remove(seq)
        self.shared.release(seq)
        if self.offload is not None and seq.kv_state is None \
                and self.offload.swap_out(seq, self.kv.block_table(seq)):
            self.num_swaps += 1
        self.kv.free(seq)
        self.policy.reset(seq)
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        seq.num_preemptions += 1
        self.max_preemptions_per_seq = max(self.max_preemptions_per_seq, seq.num_preemptions)
        self._freed.append(seq.seq_id)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Insert into `waiting` in arrival order (preempted and forked sequences are older than
        most of the queue, so they go near the front: first in line, never starved)."""
        pos = 0
        while pos < len(self.waiting) and _age(self.waiting[pos]) <= _age(seq):
            pos += 1
        self.waiting.insert(pos, seq)

    def _finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.shared.release(seq)
        if self.offload is not None:
            if seq.kv_state is None:            # an evicted history is no session to resume
                self.offload.keep_session(seq, self.kv.block_table(seq))
            self.offload.discard(seq)
        self.kv.free(seq)
        seq.status = RequestStatus.FINISHED
        self._freed.append(seq.seq_id)

    # ---- after the step ------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: dict[int, tuple[int, dict | None]]) -> None:
        """Advance computed counts, append sampled tokens, fork n > 1 siblings, finish sequences.

        Args:
            sampled: seq_id -> (token id, logprobs or None) for every sequence that sampled.
        """
        for s in output.scheduled:
            seq = s.seq
            if seq.finished:            # aborted while the step ran
                continue
            seq.num_computed_tokens += s.num_tokens
            self.policy.computed(seq, s.start, s.num_tokens)
            if _keeps_all_kv(seq):
                self.kv.cache_computed_blocks(seq)
                self.shared.progressed(seq)
            if seq.seq_id in self.forks and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._fork(seq)
            if seq.seq_id not in sampled:
                continue
            token, logprobs = sampled[seq.seq_id]
            done = seq.append_token(token, logprobs)
            if not done and seq.num_tokens >= self.config.max_model_len and not self.policy.past_context(seq):
                seq.completion.finish("length")
                done = True
            if done:
                self._finish(seq)

    def _fork(self, parent: Sequence) -> None:
        """Siblings of a request with n > 1 start from the parent's computed prompt.

        They share every full block of the prompt except the one holding the last prompt token,
        which each recomputes (at most block_size tokens) to get its own first-token logits.
        """
        siblings = self.forks.pop(parent.seq_id)
        reusable = parent.num_prompt_tokens - 1 if self.can_share else 0
        for c in siblings:
            c.num_computed_tokens = self.kv.fork(parent, c, reusable)
            c.status = RequestStatus.WAITING
            self._enqueue(c)


def _keeps_all_kv(seq: Sequence) -> bool:
    """Only a sequence whose KV policy evicts nothing has blocks that equal their hash's prefix
    (the engine switches the prefix cache off when its default policy evicts)."""
    return seq.kv_state is None


def _age(seq: Sequence) -> tuple[int, int]:
    """Sort key: lower = older (arrival order, then completion index within a request)."""
    return seq.request.arrival, seq.index
