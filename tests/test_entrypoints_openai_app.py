"""The server app in-process (FastAPI's TestClient, no subprocess): a failed engine step is a 500
in OpenAI's shape, whole and streamed, and the next request is served; `/slots` lists the
engine's requests (state, tokens, KV blocks) behind the API key."""
from __future__ import annotations

import json
import time
import unittest.mock

import pytest
from fastapi.testclient import TestClient
from helpers import make_tiny_hf_llama

from memlm import LLM
from memlm.entrypoints.openai.app import ServerState, build_app
from memlm.entrypoints.openai.slots import engine_slots
from memlm.sampling import SamplingParams

KEY = "sk-app-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = make_tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"))
    return LLM(str(d), weight_dtype="fp32", verbose=False, max_num_seqs=4, num_kv_blocks=64)


@pytest.fixture()
def client(llm):
    with TestClient(build_app(ServerState(lambda: llm, "tiny", api_key=KEY))) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app did not attach the model"
            time.sleep(0.01)
        yield c


def _failing_steps(llm, failures: int):
    """Patch llm.engine.step so that its first `failures` calls raise."""
    real, calls = llm.engine.step, []

    def step():
        calls.append(1)
        if len(calls) <= failures:
            raise RuntimeError("injected step failure")
        return real()
    return unittest.mock.patch.object(llm.engine, "step", step)


def test_a_failed_engine_step_is_a_500_and_the_server_stays_healthy(client, llm):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with _failing_steps(llm, 2):
        r = client.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert "injected step failure" in err["message"]
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3})
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1 and errors[0]["type"] == "server_error"
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert llm.metrics.kv_blocks_used == 0


def test_a_bad_request_is_still_a_400(client):
    r = client.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": [1] * 5000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_slots_need_the_key_and_are_empty_when_idle(client):
    r = client.get("/slots")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/slots", headers=AUTH)
    assert r.status_code == 200 and r.json() == []


def test_slots_show_running_and_waiting_requests(llm):
    """Engine-level: one entry per request, blocks counted once per request."""
    engine, proc = llm.engine, llm.processor
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reqs = [proc.make_request(proc.prompt({"prompt_token_ids": [1 + i] + list(range(1, 20 * (i + 1)))}, i), sp)
            for i in range(6)]   # 4 run (max_num_seqs), 2 wait; no shared prefix to wait on
    for r in reqs:
        engine.add_request(r)
    try:
        engine.step()
        slots = {s["id"]: s for s in engine_slots(engine)}
        assert set(slots) == {r.request_id for r in reqs}
        states = [slots[r.request_id]["state"] for r in reqs]
        assert states.count("running") == 4 and states.count("waiting") == 2
        for r in reqs:
            s = slots[r.request_id]
            assert s["prompt_tokens"] == len(r.prompt_token_ids) and s["n"] == 1
            held = len(engine.kv.block_table(r.sequences[0]))
            assert s["kv_blocks"] == held and (held > 0) == (s["state"] == "running")
        while engine.has_unfinished():
            engine.step()
        assert engine_slots(engine) == []
    finally:
        for r in reqs:
            engine.abort(r.request_id)
