"""GET /slots: the requests the engine holds right now, one entry each (llama-server's /slots).

Owns: the entry's shape — the request id, its state (running: holds KV blocks and is stepped;
preempted: its blocks were taken back and it waits to recompute; waiting: queued, no blocks
yet), completions, prompt tokens, generated tokens (all completions) and the distinct KV blocks
its completions hold (blocks shared between them, e.g. the prompt of n > 1, count once).
Does not know: HTTP or the API key (`app.py` guards /slots like /v1/*); it reads the engine's
scheduler and KV manager, and must run between steps (`AsyncLLM.inspect`). Engines without a
scheduler (the reference engine) have no slots to show: the list is empty.
"""
from __future__ import annotations

from memlm.engine.request import RequestStatus

_STATE_ORDER = (RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.WAITING)


def engine_slots(engine) -> list[dict]:
    """One dict per unfinished request in `engine`, in the scheduler's order (running first)."""
    scheduler, kv = getattr(engine, "scheduler", None), getattr(engine, "kv", None)
    if scheduler is None:
        return []
    seqs = [*scheduler.running, *scheduler.waiting,
            *(s for siblings in scheduler.forks.values() for s in siblings)]
    requests: dict[str, object] = {}
    for seq in seqs:
        requests.setdefault(seq.request.request_id, seq.request)
    slots = []
    for rid, req in requests.items():
        live = [s for s in req.sequences if not s.status.is_finished]
        statuses = {s.status for s in live}
        state = next((st for st in _STATE_ORDER if st in statuses), RequestStatus.WAITING)
        blocks = {b for s in live for b in kv.block_table(s)} if kv is not None else set()
        slots.append({"id": rid, "state": state.value, "n": len(req.sequences),
                      "prompt_tokens": len(req.prompt_token_ids),
                      "generated_tokens": sum(s.num_output_tokens for s in req.sequences),
                      "kv_blocks": len(blocks)})
    return slots
