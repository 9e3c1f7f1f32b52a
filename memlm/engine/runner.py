"""The model runner: SchedulerOutput -> batch tensors -> forward over paged KV -> sample.

Owns: the device, the model, the `KVStore`, per-sequence recurrent state, and building one
step's flattened batch (decodes first, grouped by cache length, then prefill chunks) with
its slot mapping. Computes logits only for rows that sample (and prompt-logprob rows, in
small chunks). Returns a typed `RunnerOutput`. For evicting KV policies it carries out what the
scheduler decided: the slot copies that pack kept entries, the attention mass H2O / SnapKV
read (into each sequence's `KVPolicyState`), and the sinks' positions.
Does not know: policy — who runs, preemption, finishing, which tokens to keep — or block
bookkeeping (each `ScheduledSeq` brings its block table from the `KVCacheManager`).

Positions under a `sinks` policy (StreamingLLM gives rotary positions by place in the cache):
a token's text position t and its cache entry c differ by the E tokens evicted before it. The
window is contiguous text, so its keys, rotated at their text positions when written, already
have the right distances to the query (at t). Only the S sink keys need moving: they must sit
E places later. The runner keeps each sink's k / v in fp32 as first computed (rotated at
positions 0 .. S-1) and, whenever E changes (one block's worth at a time), writes
R(E) applied to that copy into the sink slots: exact (one rotation from the fp32 copy, no
drift), S rows per layer per eviction, nothing per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from memlm.engine.config import GATHER_CAP_TOKENS
from memlm.models.blocks import Rotary
from memlm.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from memlm.kv.paged_view import DecodeGroup, PagedBatch, PagedView, PrefillSegment
from memlm.kv.store import KVStore
from memlm.sampling import SampleRow, Sampler, top_logprobs

LOGPROB_CHUNK = 64   # prompt-logprob rows per logits call: bounds the (rows, vocab) workspace


@dataclass
class RunnerOutput:
    """What one step produced."""

    sampled: dict[int, tuple[int, dict | None]] = field(default_factory=dict)  # seq_id -> (token, logprobs)
    prompt_logprobs: dict[int, list[dict]] = field(default_factory=dict)       # seq_id -> new entries
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    seconds: float = 0.0


class ModelRunner:
    """Runs steps over a `KVStore`; `profile()` can run before the store exists."""

    def __init__(self, model, device: torch.device, block_size: int,
                 gather_cap_tokens: int = GATHER_CAP_TOKENS):
        self.model = model
        self.store: KVStore | None = None
        self.device = device
        self.block_size = block_size
        self.gather_cap = gather_cap_tokens   # padded K/V tokens gathered per decode group
        self.sampler = Sampler()
        self.recurrent_states: dict = {}
        self.sink_copies: dict[int, torch.Tensor] = {}   # seq_id -> (layers, 2, S, nkv, hd) fp32
        self.sink_shift: dict[int, int] = {}             # seq_id -> places its sinks were moved

    def drop_states(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.sink_copies.pop(sid, None)
            self.sink_shift.pop(sid, None)
        if self.recurrent_states and seq_ids:
            gone = set(seq_ids)
            for key in [k for k in self.recurrent_states if k[0] in gone]:
                del self.recurrent_states[key]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        t0 = time.perf_counter()
        self.drop_states(out.freed_seq_ids)
        dev, bs = self.device, self.block_size
        if out.kv_moves:
            self.store.copy_slots(torch.tensor(out.kv_moves.src, dtype=torch.long, device=dev),
                                  torch.tensor(out.kv_moves.dst, dtype=torch.long, device=dev))
        decodes = sorted((s for s in out.scheduled if s.is_decode),
                         key=lambda s: (_needs_mass(s), -s.cache_start))
        plain = sum(1 for s in decodes if not _needs_mass(s))
        prefills = [s for s in out.scheduled if not s.is_decode]
        order = decodes + prefills
        input_ids, positions, slots, sink_rows = [], [], [], []
        for s in order:
            input_ids += s.token_ids
            positions += range(s.start, s.start + s.num_tokens)
            for c in range(s.cache_start, s.cache_start + s.num_tokens):
                slots.append(s.block_table[c // bs] * bs + c % bs)
            sink_rows += self._sinks_of(s, len(positions) - s.num_tokens)
        batch = PagedBatch(torch.tensor(slots, dtype=torch.long, device=dev),
                           self._prefill_segments(prefills, len(decodes)),
                           self._decode_groups(decodes[:plain]) + self._decode_groups(decodes[plain:], plain),
                           sink_rows)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)     # (N,)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)     # (N,)
        self._shift_sinks(out.scheduled)
        hidden = self.model(ids_t, pos_t, PagedView(self.store, batch, self.recurrent_states))  # (N, H)
        self._collect_mass(batch, order, len(decodes))

        result = RunnerOutput(num_decode_tokens=len(decodes),
                              num_prefill_tokens=sum(s.num_tokens for s in prefills))
        row, rows, sample_rows, sample_ids = 0, [], [], []
        for s in order:
            last = row + s.num_tokens - 1
            if self._wants_prompt_logprobs(s):
                result.prompt_logprobs[s.seq.seq_id] = self._prompt_logprobs(s, hidden[row:last + 1])
            if s.samples:
                seq = s.seq
                rows.append(last)
                sample_rows.append(SampleRow(seq.request.params, seq.generator, seq.prompt_token_ids,
                                             seq.output_token_ids, seq.grammar))
                sample_ids.append(seq.seq_id)
            row = last + 1
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])  # (S, V)
            sampled = self.sampler(logits, sample_rows)
            for sid, tok, lp in zip(sample_ids, sampled.token_ids, sampled.logprobs):
                result.sampled[sid] = (tok, lp)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - t0
        return result

    def _prefill_segments(self, prefills: list[ScheduledSeq], row: int) -> list[PrefillSegment]:
        segs = []
        for s in prefills:
            nb = -(-(s.cache_start + s.num_tokens) // self.block_size)
            table = torch.tensor(s.block_table[:nb], dtype=torch.long, device=self.device)
            seg = PrefillSegment(row, row + s.num_tokens, s.cache_start, table, s.seq.seq_id)
            st = s.seq.kv_state
            # H2O scores every chunk by its last W queries; SnapKV only the prompt's last W
            if st is not None and (st.spec.policy == "h2o" or (
                    st.spec.policy == "snap" and s.start + s.num_tokens >= s.seq.num_prompt_tokens)):
                seg.observe = st.spec.window
                seg.mass = torch.zeros(self.store.n_kv_heads, nb * self.block_size, device=self.device)
            segs.append(seg)
            row += s.num_tokens
        return segs

    def _sinks_of(self, s: ScheduledSeq, row: int) -> list[tuple[int, torch.Tensor, int]]:
        """(row, copy, i) for the tokens of `s` that are sinks of a `sinks` policy."""
        st = s.seq.kv_state
        if st is None or st.spec.policy != "sinks" or not st.spec.sinks or s.start >= st.spec.sinks:
            return []
        copy = self.sink_copies.get(s.seq.seq_id)
        if copy is None:
            copy = torch.zeros(len(self.store.layer_of_depth), 2, st.spec.sinks, self.store.n_kv_heads,
                               self.store.head_dim, device=self.device)
            self.sink_copies[s.seq.seq_id] = copy
        return [(row + i, copy, s.start + i) for i in range(min(s.num_tokens, st.spec.sinks - s.start))]

    def _shift_sinks(self, scheduled: list[ScheduledSeq]) -> None:
        """Rewrite the sink keys of sequences whose window slid since their last step (see the
        module docstring): k at position i + E, from the fp32 copy rotated at i."""
        rotary = getattr(self.model, "rotary", None)
        for s in scheduled:
            st, sid = s.seq.kv_state, s.seq.seq_id
            if rotary is None or sid not in self.sink_copies or st.spec.policy != "sinks":
                continue
            shift = st.num_evicted
            if shift == self.sink_shift.get(sid, 0):
                continue
            self.sink_shift[sid] = shift
            copy, n = self.sink_copies[sid], st.spec.sinks
            bs, table = self.block_size, s.block_table
            slots = torch.tensor([table[c // bs] * bs + c % bs for c in range(n)], device=self.device)
            cos, sin = rotary.cos_sin(torch.tensor([shift], device=self.device))   # (1, 1, hd)
            for depth, li in self.store.layer_of_depth.items():
                k = Rotary.apply(copy[li, 0], cos, sin)                              # (S, nkv, hd)
                self.store.write(depth, slots, k, copy[li, 1])

    def _collect_mass(self, batch: PagedBatch, order: list[ScheduledSeq], num_decodes: int) -> None:
        """Add this step's attention mass (summed over KV heads) to each sequence's policy state."""
        for g in batch.decodes:
            if g.mass is not None:
                for i, s in enumerate(order[g.start:g.end]):
                    s.seq.kv_state.add_mass(g.mass[i, :, :s.cache_start + 1].sum(0).cpu())
        for p, s in zip(batch.prefills, order[num_decodes:]):
            if p.mass is not None:
                s.seq.kv_state.add_mass(p.mass[:, :s.cache_start + s.num_tokens].sum(0).cpu())

    def _decode_groups(self, decodes: list[ScheduledSeq], row: int = 0) -> list[DecodeGroup]:
        """Split decodes (sorted by context length, longest first) into padded groups.

        A new group starts when the padded gather would pass `gather_cap` tokens or a sequence
        is much shorter than the group's longest (padding would waste more than it saves).
        """
        groups, start, bs = [], 0, self.block_size
        native = self.store is not None and self.store.native_decode   # no padding cost: one group
        while start < len(decodes):
            nb = -(-(decodes[start].cache_start + 1) // bs)
            end = start + 1
            while end < len(decodes):
                nb_i = -(-(decodes[end].cache_start + 1) // bs)
                if not native and ((end - start + 1) * nb * bs > self.gather_cap or nb_i < 0.6 * nb):
                    break
                end += 1
            members = decodes[start:end]
            tables = torch.zeros(len(members), nb, dtype=torch.long)
            lens = torch.empty(len(members), dtype=torch.long)
            for i, s in enumerate(members):
                k = -(-(s.cache_start + 1) // bs)
                tables[i, :k] = torch.tensor(s.block_table[:k])
                lens[i] = s.cache_start + 1
            mask = None if native else (torch.arange(nb * bs)[None, :] < lens[:, None])[:, None, None, :]
            mass = (torch.zeros(len(members), self.store.n_kv_heads, nb * bs, device=self.device)
                    if _needs_mass(members[0]) else None)
            groups.append(DecodeGroup(row + start, row + end, tables.to(self.device), lens.to(self.device),
                                      mask if mask is None else mask.to(self.device),
                                      [s.seq.seq_id for s in members], mass))
            start = end
        return groups

    @torch.inference_mode()
    def warm_up(self, num_tokens: int, num_seqs: int) -> None:
        """Create every bf16 matmul shape the engine will use (oneDNN keeps per-shape state that
        stays resident; see `kernels.cpu.row_bucket`), so it is measured as resident, not workspace."""
        if self.device.type == "cpu":
            # The head only runs the rows that sample, or chunks of prompt logprobs.
            head_rows = max(num_seqs, min(num_tokens, LOGPROB_CHUNK))
            self.model.warm_up(max(num_tokens, num_seqs), head_rows)

    def estimate_step_bytes(self, num_tokens: int, num_seqs: int, max_model_len: int) -> int:
        """A prediction, before anything runs, of what `warm_up` + `profile` at this step will
        hold: the matmul state it leaves, the step's workspace and what it leaves resident.

        Only for choosing a step that fits a small budget (the plan uses the measured figures).
        Calibrated on SmolLM2 (AMD EPYC, Q4_1 blocks and bf16) against the measured profile
        at 64..2048 tokens: within -20% .. +40% of it, over more often than under.
        """
        cfg = self.model.cfg
        n_dec = min(num_seqs, max(1, num_tokens - 1))
        ctx = max(num_tokens - n_dec, min(max_model_len, 4096))
        heads = 2 * cfg.num_kv_heads + 2 * cfg.num_heads      # gathered K/V + GQA-expanded copies
        attention = 2 * 4 * ctx * cfg.head_dim * heads         # one layer's prefill temporaries
        rows = 4 * num_tokens * (8 * cfg.hidden_size + 4 * cfg.intermediate_size + 4 * cfg.num_heads * cfg.head_dim)
        sampling = 4 * 4 * num_seqs * cfg.vocab_size           # logits, softmax, sort, logprobs
        state = 8 * 2**20 + 40 * num_tokens * cfg.hidden_size  # per-shape matmul state (warm-up)
        return attention + rows + sampling + state + 8 * 2**20  # + what a step leaves resident

    @torch.inference_mode()
    def profile(self, num_tokens: int, num_seqs: int, max_model_len: int, kv_dtype) -> None:
        """Run the largest step the engine may schedule, on a throw-away store, so the caller can
        measure its peak memory: a prefill chunk late in a long prompt, `num_seqs` decodes
        gathering `gather_cap` K/V tokens, and sampling `num_seqs` rows with top-p + logprobs.
        """
        from memlm.sampling import SamplingParams, make_generator
        cfg, bs, dev = self.model.cfg, self.block_size, self.device
        n_dec = min(num_seqs, max(1, num_tokens - 1))
        n_pre = num_tokens - n_dec
        ctx = max(n_pre, min(max_model_len, 4096))                 # prefill context after the chunk
        nb_pre = -(-ctx // bs)
        # A few real blocks, referenced over and over: the gathers and attention run at full size
        # while the throw-away store itself stays small (it is not workspace).
        nb_store = min(nb_pre, 8)
        store = KVStore(cfg.attention_depths, nb_store, bs, cfg.num_kv_heads, cfg.head_dim, kv_dtype, dev)
        nb_dec = max(1, min(self.gather_cap // (n_dec * bs), -(-max_model_len // bs)))
        tables = torch.arange(n_dec * nb_dec, device=dev).view(n_dec, nb_dec) % nb_store
        mask = torch.ones(n_dec, 1, 1, nb_dec * bs, dtype=torch.bool, device=dev)
        prefill = PrefillSegment(n_dec, num_tokens, ctx - n_pre, torch.arange(nb_pre, device=dev) % nb_store, -1)
        slots = torch.arange(num_tokens, device=dev) % (nb_store * bs)
        lens = torch.full((n_dec,), nb_dec * bs, dtype=torch.long, device=dev)
        batch = PagedBatch(slots, [prefill] if n_pre else [], [DecodeGroup(0, n_dec, tables, lens, mask)])
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        pos = torch.cat([torch.full((n_dec,), min(nb_dec * bs, max_model_len) - 1),
                         torch.arange(ctx - n_pre, ctx)]).to(dev).clamp_max(max_model_len - 1)
        hidden = self.model(ids, pos, PagedView(store, batch, {}))
        params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=5, max_tokens=1)
        rows = [SampleRow(params, make_generator(0, dev)) for _ in range(num_seqs)]
        logits = self.model.compute_logits(hidden[:1].expand(num_seqs, -1).contiguous())
        self.sampler(logits, rows)

    @staticmethod
    def _wants_prompt_logprobs(s: ScheduledSeq) -> bool:
        req = s.seq.request
        return (s.seq.index == 0 and req.needs_prompt_logprobs
                and len(req.prompt_logprobs) == s.start + 1 and s.start < s.seq.num_prompt_tokens)

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> list[dict]:
        """Log-probabilities of prompt tokens start+1 .. from this chunk's rows (chunked)."""
        req = s.seq.request
        P, n = s.seq.num_prompt_tokens, req.params.prompt_logprobs
        rows = min(s.num_tokens, P - 1 - s.start)   # rows whose next token is a prompt token
        out = []
        for a in range(0, rows, LOGPROB_CHUNK):
            b = min(rows, a + LOGPROB_CHUNK)
            lp = torch.log_softmax(self.model.compute_logits(hidden[a:b]).float(), dim=-1)  # (c, V)
            for i in range(b - a):
                out.append(top_logprobs(lp[i], req.prompt_token_ids[s.start + a + i + 1], n))
        return out


def _needs_mass(s: ScheduledSeq) -> bool:
    """The sequence's decode attention must report mass (h2o; snap ranks its prompt once, from
    the prompt's last queries)."""
    return s.seq.kv_state is not None and s.seq.kv_state.spec.policy == "h2o"
