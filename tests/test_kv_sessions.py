"""Persistent chat sessions: id validation, prefix matching, resume across turns and restarts
with outputs identical to recomputing, and corrupt / foreign files recomputed, never served."""
import pytest

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.errors import RequestError
from memlm.kv.entry import decode
from memlm.kv.sessions import resumable_tokens, validate_session_id

SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return ef.tiny_loaded(ef.llama_config(), seed=5)


def llm(loaded, **kw):
    kw.setdefault("kv_dtype", "fp32")
    kw.setdefault("enable_prefix_caching", False)
    engine = LLM(loaded, engine="paged", verbose=False, num_kv_blocks=64, max_num_seqs=4, **kw)
    engine.engine.cost.learn = False      # the default rates: restoring pays (no timing noise)
    return engine


def conversation(turns: int, replies: list[str]) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a terse assistant who answers in one line."}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"question number {t}: what is {t} plus {t}?"})
        if t < len(replies):
            msgs.append({"role": "assistant", "content": replies[t]})
    return msgs


def run_turns(engine, turns: int, session_id=None, replies=None) -> list[list[int]]:
    """Chat `turns` turns, feeding each reply back; returns each turn's reply tokens."""
    replies = [] if replies is None else replies
    out = []
    for t in range(len(replies), turns):
        o = engine.chat(conversation(t + 1, replies), SP, session_id=session_id)[0].outputs[0]
        replies.append(o.text)
        out.append(o.token_ids)
    return out


@pytest.mark.parametrize("good", ["abc", "A-b_9", "x" * 64])
def test_valid_session_ids(good):
    assert validate_session_id(good) == good


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a.b", "x" * 65, "sp ace", "é", None, 7])
def test_invalid_session_ids_are_refused(bad):
    with pytest.raises(RequestError, match="invalid session_id"):
        validate_session_id(bad)


def test_resumable_tokens_counts_whole_common_blocks_short_of_the_last_prompt_token():
    saved = list(range(20))
    assert resumable_tokens(saved, list(range(30)), 4) == 20
    assert resumable_tokens(saved, list(range(9)) + [99] * 10, 4) == 8
    assert resumable_tokens(saved, list(range(16)), 4) == 12      # the last prompt token is computed
    assert resumable_tokens(saved, [5] + list(range(1, 30)), 4) == 0


def test_session_turns_restore_history_and_match_recompute(loaded):
    plain = run_turns(llm(loaded), 3)
    engine = llm(loaded, warm_fraction=0.3)
    assert run_turns(engine, 3, session_id="chat-1") == plain
    m = engine.metrics
    assert m.session_hits == 2 and m.session_tokens_restored > 0 and m.warm_bytes > 0


def test_session_blocks_stay_hot_while_the_prefix_cache_holds_them(loaded):
    """With room in the pool the next turn starts at its hot cached prefix: the saved entry is
    not even read (no session hit), and the replies equal recomputing; evicted, it is restored."""
    plain = run_turns(llm(loaded), 3)
    hot = llm(loaded, warm_fraction=0.3, enable_prefix_caching=True)
    sessions = hot.engine.offload.sessions
    assert run_turns(hot, 3, session_id="hot-1") == plain
    m = hot.metrics
    assert m.session_hits == 0 and m.prefix_cache_hits > 0 and m.warm_bytes > 0
    assert sessions.known_tokens("hot-1", list(range(5))) == 0       # saved, and known without a read
    # a pool too small to keep them: the next turns restore from the warm tier instead
    small = llm(loaded, warm_fraction=0.3, enable_prefix_caching=True)
    replies = []
    run_turns(small, 1, "s-2", replies)
    small.generate(ef.random_prompts(8, 180, 200, seed=9), SamplingParams(temperature=0, max_tokens=4))
    assert run_turns(small, 2, "s-2", replies) == plain[1:2]
    assert small.metrics.session_hits == 1


def test_sessions_survive_a_restart_with_identical_outputs(loaded, tmp_path):
    plain = run_turns(llm(loaded), 3)
    first = llm(loaded, session_dir=str(tmp_path))
    replies = []
    assert run_turns(first, 2, "s1", replies) == plain[:2]
    first.engine.offload.cold.flush()
    assert (tmp_path / "s-s1.kv").exists()
    second = llm(loaded, session_dir=str(tmp_path))               # a new process's engine
    assert run_turns(second, 3, "s1", replies) == plain[2:]
    second.engine.offload.cold.flush()
    assert second.metrics.session_hits == 1 and second.metrics.cold_bytes > 0


def forge(blob: bytes) -> bytes:
    """`blob` claiming 64 more slots than its payload holds, with a valid checksum: it passes
    the lookup and fails only while being decompressed into the blocks."""
    import json
    import struct
    import zlib

    from memlm.kv import entry as E
    (hlen,) = struct.unpack_from("<I", blob, len(E.MAGIC))
    start = len(E.MAGIC) + 4
    header = json.loads(blob[start:start + hlen])
    header["tensors"][0][2][2] += 64
    text = json.dumps(header).encode()
    body = E.MAGIC + struct.pack("<I", len(text)) + text + blob[start + hlen:-E.DIGEST_BYTES]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_codec", "forged"])
def test_corrupt_truncated_or_foreign_session_files_are_recomputed(loaded, tmp_path, damage):
    plain = run_turns(llm(loaded), 2)
    first = llm(loaded, session_dir=str(tmp_path))
    replies = []
    run_turns(first, 1, "s1", replies)
    first.engine.offload.cold.flush()
    path = tmp_path / "s-s1.kv"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 100]))
    elif damage == "forged":
        path.write_bytes(forge(bytes(data)))
    kv_dtype = "fp16" if damage == "other_codec" else "fp32"
    second = llm(loaded, session_dir=str(tmp_path), kv_dtype=kv_dtype)
    got = run_turns(second, 2, "s1", replies)
    if kv_dtype == "fp32":
        assert got == plain[1:]
    assert second.metrics.session_hits == 0 and second.engine.offload.sessions.rejected == 1
    second.engine.offload.cold.flush()          # the rejected file was removed; this turn's KV replaced it
    assert decode(path.read_bytes(), second.engine.offload.fp).num_blocks > 0


def test_session_disk_budget_evicts_the_oldest_sessions(loaded, tmp_path):
    probe = llm(loaded, session_dir=str(tmp_path / "probe"))
    run_turns(probe, 1, "p")
    probe.engine.offload.cold.flush()
    one = (tmp_path / "probe" / "s-p.kv").stat().st_size
    engine = llm(loaded, session_dir=str(tmp_path / "d"), disk_budget=int(one * 2.5))
    for sid in ("a", "b", "c", "d"):
        run_turns(engine, 1, sid)
        engine.engine.offload.cold.flush()
    cold = engine.engine.offload.cold
    assert sorted(cold.keys()) == ["s-c", "s-d"] and cold.nbytes <= int(one * 2.5)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["s-c.kv", "s-d.kv"]


def test_session_id_needs_a_tier_and_the_paged_engine(loaded):
    msgs = conversation(1, [])
    with pytest.raises(RequestError, match="session_dir"):
        llm(loaded).chat(msgs, SP, session_id="x")
    with pytest.raises(RequestError, match="session_dir"):
        LLM(loaded, engine="reference").chat(msgs, SP, session_id="x")
    with pytest.raises(RequestError, match="invalid session_id"):
        llm(loaded, warm_fraction=0.2).chat(msgs, SP, session_id="../up")
    with pytest.raises(RequestError, match="one per conversation"):
        llm(loaded, warm_fraction=0.2).chat([msgs, msgs], SP, session_id="x")


def test_server_chat_session_id_resumes_and_bad_ids_are_400(tmp_path):
    import time

    from fastapi.testclient import TestClient
    from helpers import make_tiny_hf_llama

    from memlm.entrypoints.openai.app import ServerState, build_app
    engine = LLM(str(make_tiny_hf_llama(tmp_path / "m")), weight_dtype="fp32", verbose=False, max_num_seqs=2,
                 num_kv_blocks=64, session_dir=str(tmp_path / "sessions"), enable_prefix_caching=False)
    with TestClient(build_app(ServerState(lambda: engine, "tiny"))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        msgs = [{"role": "user", "content": "Count from one to twenty, please, slowly and clearly."}]
        body = {"model": "tiny", "max_tokens": 20, "temperature": 0, "session_id": "web-1"}
        first = client.post("/v1/chat/completions", json={**body, "messages": msgs})
        assert first.status_code == 200, first.text
        msgs += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And back down again."}]
        assert client.post("/v1/chat/completions", json={**body, "messages": msgs}).status_code == 200
        assert engine.metrics.session_hits == 1
        bad = client.post("/v1/chat/completions", json={**body, "messages": msgs, "session_id": "../x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_id"
