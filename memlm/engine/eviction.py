"""The scheduler's KV-policy step: keep an evicting sequence inside its cache budget.

Owns: attaching a request's resolved `KVPolicySpec` (its own fields over the engine's defaults)
as each sequence's `KVPolicyState`, how many tokens such a sequence may compute in one step, and
`shrink`: asking `kv/policies.py` which cache entries to keep before a step writes more, telling
the `KVCacheManager` to drop the freed tail blocks (back to the pool at once), and listing the
slot copies that pack the kept entries (`SlotMoves`, done by the runner before the forward);
`relieve`: the same when the pool is short, down to the low end of a policy's range, so the
scheduler preempts nobody while an evicting sequence can still give a block back. Under a
block KV codec (int4 / int2) window / h2o / snap drop whole table blocks instead (no slot moves).
Does not know: tensors, the model, or which entries a policy prefers (`kv/policies.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memlm.engine.request import Request, Sequence
from memlm.kv.manager import KVCacheManager
from memlm.kv.policies import (BLOCK_POLICIES, KVPolicySpec, KVPolicyState, compaction_moves, plan_block_eviction,
                               plan_block_relief, plan_eviction, plan_relief)


@dataclass
class SlotMoves:
    """KV slot copies for the runner to make before this step's forward: src[i] -> dst[i]."""

    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.src)


class PolicyStep:
    """Eviction for the sequences of one scheduler.

    Args:
        kv: the engine's block tables.
        defaults: kv_policy / kv_window / kv_sinks / kv_budget for requests that leave them None.
        rotary: the model's positions are rotary, so a bounded cache can run past its context.
        per_token_kv: the KV codec stores single tokens; a block codec (int4 / int2) cannot evict
            them, so there window / h2o / snap evict whole blocks (`kv/policies.plan_block_eviction`)
            and `sinks` (whose sink keys are re-rotated in place) is refused per request.
    """

    def __init__(self, kv: KVCacheManager, defaults, rotary: bool = True, per_token_kv: bool = True):
        self.kv, self.defaults, self.rotary, self.per_token_kv = kv, defaults, rotary, per_token_kv
        self.num_relieved = 0      # times a sequence shrank for the pool instead of a preemption

    def attach(self, request: Request) -> KVPolicySpec:
        """Resolve the request's policy and give each sequence its state (none under `full`).

        Raises:
            ValueError: a bad policy parameter (the message names it and the fix).
        """
        p = request.params
        spec = KVPolicySpec.resolve(p.kv_policy or self.defaults.kv_policy, p.kv_window, p.kv_sinks,
                                    p.kv_budget, self.defaults)
        if spec.evicts and not self.per_token_kv:
            bs = self.kv.block_size
            if spec.policy not in BLOCK_POLICIES:
                raise ValueError(f"kv_policy={spec.policy} evicts single tokens, which this engine's block "
                                 "KV codec cannot (it evicts whole blocks: kv_policy window, h2o or snap); "
                                 "use kv_dtype fp16, fp32 or int8")
            if spec.policy == "window" and spec.window < 2 * bs:
                raise ValueError(f"kv_window ({spec.window}) must be at least 2 blocks ({2 * bs} tokens) with "
                                 "a block KV codec, which evicts whole blocks; raise kv_window")
            if spec.sinks > bs:
                raise ValueError(f"kv_sinks ({spec.sinks}) must fit one block ({bs}) with a block KV codec, "
                                 "which keeps the sinks' whole block; lower kv_sinks")
            least = 4 * bs if spec.policy == "h2o" else 2 * bs
            if spec.policy != "window" and spec.budget < least:
                raise ValueError(f"kv_budget ({spec.budget}) must be at least {least // bs} blocks ({least} "
                                 f"tokens) for kv_policy={spec.policy} with a block KV codec, which evicts "
                                 "whole blocks; raise kv_budget")
        if spec.evicts and len(request.sequences) > 1:
            raise ValueError(f"kv_policy={spec.policy} needs n=1 (completions cannot share an evicting cache)")
        for seq in request.sequences:
            seq.kv_state = KVPolicyState(spec) if spec.evicts else None
            if spec.evicts:
                self.kv.keep_private(seq)
        return spec

    def past_context(self, seq: Sequence) -> bool:
        """True when `seq` may hold more text than the model's context (its cache stays bounded)."""
        return seq.kv_state is not None and seq.kv_state.spec.past_context and self.rotary

    def chunk(self, seq: Sequence, n: int) -> int:
        """At most `n` tokens this step: an evicting sequence's chunk leaves half its window."""
        st = seq.kv_state
        if st is None or st.spec.policy == "snap":
            return n
        return max(1, min(n, (st.spec.budget - st.spec.sinks) // 2))

    def cache_tokens(self, seq: Sequence, num_tokens: int) -> int:
        """Cache entries `seq` needs to hold `num_tokens` more tokens of text (bounded by its
        budget, except snap's generation, which appends after the one-shot compression)."""
        st = seq.kv_state
        if st is None or st.spec.policy == "snap":
            return num_tokens
        return max(0, min(num_tokens, st.spec.budget - self.kv.num_cached_tokens(seq)))

    def shrink(self, seq: Sequence, incoming: int, moves: SlotMoves) -> int:
        """Evict so that `incoming` more tokens fit `seq`'s budget (a no-op for most steps).

        Returns:
            The number of blocks freed.
        """
        st = seq.kv_state
        if st is None:
            return 0
        if not self.per_token_kv:
            return self._drop(seq, plan_block_eviction(st, incoming, self.kv.block_size, seq.num_prompt_tokens))
        kept = plan_eviction(st, incoming, self.kv.block_size, seq.num_prompt_tokens)
        return 0 if kept is None else self._keep(seq, kept, moves)

    def relieve(self, candidates: list[Sequence], current: Sequence, incoming: int, moves: SlotMoves) -> bool:
        """The pool is short for `current`'s `incoming` tokens: before anyone is preempted, evict
        one of `candidates` (newest first; none of them scheduled yet this step) down to the low
        end of its policy's range (`kv/policies.plan_relief`).

        Returns:
            True when blocks went back to the pool (the caller tries to allocate again).
        """
        for seq in reversed(candidates):
            st = seq.kv_state
            if st is None:
                continue
            mine = incoming if seq is current else 0
            if not self.per_token_kv:
                if self._drop(seq, plan_block_relief(st, self.kv.block_size, mine)):
                    self.num_relieved += 1
                    return True
                continue
            kept = plan_relief(st, self.kv.block_size, mine)
            if kept is not None and self._keep(seq, kept, moves):
                self.num_relieved += 1
                return True
        return False

    def _keep(self, seq: Sequence, kept: list[int], moves: SlotMoves) -> int:
        """Pack `seq`'s `kept` entries into the front (slot copies into `moves`), free the tail."""
        st = seq.kv_state
        table, bs = self.kv.block_table(seq), self.kv.block_size
        for src, dst in compaction_moves(kept, st.num_cached):
            moves.src.append(table[src // bs] * bs + src % bs)
            moves.dst.append(table[dst // bs] * bs + dst % bs)
        st.apply(kept)
        return self.kv.evict(seq, len(kept))

    def _drop(self, seq: Sequence, blocks: list[int] | None) -> int:
        """Drop whole table blocks of `seq` (a block codec's eviction: nothing moves)."""
        if not blocks:
            return 0
        seq.kv_state.drop_blocks(blocks, self.kv.block_size)
        return self.kv.drop_blocks(seq, blocks)

    @staticmethod
    def computed(seq: Sequence, start: int, n: int) -> None:
        """The step wrote tokens start .. start + n - 1 of `seq` after its kept entries."""
        if seq.kv_state is not None:
            seq.kv_state.append(start, n)

    def reset(self, seq: Sequence) -> None:
        """`seq` lost its KV (preempted): it recomputes, and evicts again, from the start."""
        if seq.kv_state is not None:
            seq.kv_state.reset()
            self.kv.keep_private(seq)
