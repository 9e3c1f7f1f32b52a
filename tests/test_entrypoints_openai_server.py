"""`memlm serve` as a live subprocess on a loopback port, serving a tiny random Llama (real BPE
tokenizer and chat template): the openai SDK (sync, async, streaming with usage), echo +
logprobs against `LLM` with prompt logprobs, every error status, /metrics, a disconnect that
frees KV blocks, 429 back-pressure, 503 while loading, and a SIGTERM drain that exits 0.

Two servers per module: `server` (API key, 8 sequences) and `small` (one sequence, one waiting
request), whose last test shuts it down.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from helpers import make_tiny_hf_llama

from memlm import LLM, SamplingParams

KEY = "sk-test-1234"
NAME = "tiny"
CONTEXT = 1024
TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `memlm serve` subprocess; `statuses` are the /health answers seen while starting,
    `api_while_loading` the error codes of the API routes asked while /health said 503."""

    def __init__(self, model_dir, log_path, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "MEMLM_API_KEY": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memlm", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--served-model-name", NAME, "--threads", "1", "--weight-dtype", "fp32", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.statuses: list[int] = []
        self.api_while_loading: list[tuple[int, str]] = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            self.statuses.append(status)
            if status == 200:
                return
            r = httpx.post(self.url + "/v1/completions", json={"prompt": "hi"}, timeout=5)
            if r.status_code != 200:
                self.api_while_loading.append((r.status_code, r.json()["error"]["code"]))
            time.sleep(0.01)
        raise AssertionError(f"server not healthy after {TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path, encoding="utf-8", errors="replace").read()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([^#\s][^\s]*)\s+(\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT     # room for long streams
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY,
               "--memory-budget", "1GiB", "--max-num-seqs", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "small.log", "--max-num-seqs", "1",
               "--max-waiting", "1", "--drain-timeout", "20")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), weight_dtype="fp32", verbose=False, max_num_seqs=4, num_kv_blocks=128)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ---- the openai SDK -------------------------------------------------------------------------
def test_sdk_completion_and_chat_match_offline(server, offline):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [NAME]
    want = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=6,
                                                                    ignore_eos=True))[0].outputs[0]
    got = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=6, **GREEDY)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 6 and got.usage.prompt_tokens > 0

    messages = [{"role": "user", "content": "Hello world"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=5, **GREEDY)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 5


def test_sdk_async_streams_with_usage(server, offline):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    messages = [{"role": "user", "content": "memlm runs"}]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def completion():
        chunks = [c async for c in await client.completions.create(
            model=NAME, prompt="Hello world", max_tokens=8, stream=True,
            stream_options={"include_usage": True}, **GREEDY)]
        return chunks

    async def chat():
        return [c async for c in await client.chat.completions.create(
            model=NAME, messages=messages, max_completion_tokens=8, stream=True,
            stream_options={"include_usage": True}, **GREEDY)]

    async def main():
        out = await asyncio.gather(completion(), chat())
        await client.close()
        return out

    comp, chat_chunks = asyncio.run(main())
    assert "".join(c.choices[0].text for c in comp if c.choices) == \
        offline.generate("Hello world", sp)[0].outputs[0].text
    assert comp[-1].choices == [] and comp[-1].usage.completion_tokens == 8
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == offline.chat(messages, sp)[0].outputs[0].text
    assert [c.choices[0].finish_reason for c in chat_chunks if c.choices][-1] == "length"
    assert chat_chunks[-1].usage.completion_tokens == 8


def test_echo_logprobs_equal_llm_prompt_logprobs(server, offline):
    """lm-evaluation-harness's loglikelihood request (token-id prompts, echo, logprobs=1,
    max_tokens 0 or 1) gives the same prompt logprobs as LLM.generate(prompt_logprobs=1)."""
    tk = offline.tokenizer
    prompts = [tk.encode("The quick brown fox jumps"), tk.encode("Hello world, numbers 1234")]
    want = offline.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    for max_tokens in (0, 1):
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": NAME, "prompt": prompts, "echo": True, "logprobs": 1,
                             "max_tokens": max_tokens, "temperature": 0}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == max_tokens * len(prompts)
        for choice, ids, w in zip(body["choices"], prompts, want):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            for k in range(1, len(ids)):
                assert math.isclose(lp["token_logprobs"][k], w.prompt_logprobs[k][ids[k]], abs_tol=1e-4)
                assert max(lp["top_logprobs"][k].values()) >= lp["token_logprobs"][k] - 1e-6
            assert choice["text"].startswith(tk.decode(ids))


def test_chat_json_schema_answer_parses_and_validates(server):
    import jsonschema
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "sunny"],
              "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}}}
    got = _client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather?"}], max_completion_tokens=40,
        temperature=0.7, seed=5, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert _error(r, 400)["param"] == "response_format"


def test_completions_response_format_json_schema_and_json_object(server):
    import jsonschema
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    got = _client(server).completions.create(
        model=NAME, prompt=["A number:", "Another:"], max_tokens=24, temperature=0.8, seed=3,
        extra_body={"response_format": {"type": "json_schema",       # the SDK's completions
                                        "json_schema": {"name": "n", "schema": schema}}})  # lack it
    assert len(got.choices) == 2
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), schema)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "JSON:", "max_tokens": 40, "temperature": 0.8, "seed": 1}
    r = httpx.post(server.url + "/v1/completions", headers=auth, timeout=TIMEOUT,
                   json={**body, "response_format": {"type": "json_object"}})
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":        # the grammar ended it: the text is whole JSON
        assert isinstance(json.loads(choice["text"]), dict)
    else:                                         # cut at max_tokens: still a JSON prefix
        assert choice["text"].lstrip().startswith("{")
    r = httpx.post(server.url + "/v1/completions", headers=auth,
                   json={**body, "response_format": {"type": "yaml"}})
    assert _error(r, 400)["param"] == "response_format"


def test_choices_logprobs_and_stop_strings(server, offline):
    """Two prompts x n=2 -> choices 0..3 in prompt order; chat logprobs match LLM's; stop."""
    client = _client(server)
    got = client.completions.create(model=NAME, prompt=["Hello world", "The quick"], n=2, max_tokens=4,
                                    temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1, 2, 3] and got.usage.completion_tokens == 16
    want = offline.generate(["Hello world", "The quick"], SamplingParams(
        n=2, max_tokens=4, temperature=0.9, seed=11, ignore_eos=True))
    assert [c.text for c in got.choices] == [c.text for o in want for c in o.outputs]

    messages = [{"role": "user", "content": "memlm"}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=4,
                                         logprobs=True, top_logprobs=2, **GREEDY)
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                 logprobs=2))[0].outputs[0]
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    for entry, tid, lp in zip(content, want.token_ids, want.logprobs):
        assert math.isclose(entry.logprob, lp[tid], abs_tol=1e-4) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == max(lp.values())       # greedy: the best one

    text = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8,
                                                                   ignore_eos=True))[0].outputs[0].text
    stop = text[3:5]
    got = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=8, stop=[stop],
                                    **GREEDY)
    assert got.choices[0].text == text[:text.index(stop)] and got.choices[0].finish_reason == "stop"


# ---- errors ---------------------------------------------------------------------------------
def test_error_statuses(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2}
    assert _error(httpx.post(url + "/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    _error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/health").status_code == 200          # not behind the key
    err = _error(httpx.post(url + "/v1/completions", json={**body, "model": "gpt-9"}, headers=auth), 404)
    assert err["param"] == "model"
    for field, value in (("temperature", -1), ("top_p", 2.0), ("n", "x"), ("logit_bias", {"1": 5})):
        err = _error(httpx.post(url + "/v1/completions", json={**body, field: value}, headers=auth), 400)
        assert err["param"] == field, err
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    err = _error(httpx.post(url + "/v1/chat/completions", json={**chat, "top_logprobs": 50,
                                                                 "logprobs": True}, headers=auth), 400)
    assert err["param"] == "top_logprobs"
    err = _error(httpx.post(url + "/v1/chat/completions", json={**chat, "max_completion_tokens": 0},
                            headers=auth), 400)
    assert err["param"] == "max_completion_tokens"
    err = _error(httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{}]},
                            headers=auth), 400)
    assert err["param"] == "messages"
    long_prompt = [5] * CONTEXT
    err = _error(httpx.post(url + "/v1/completions", json={**body, "prompt": long_prompt}, headers=auth), 400)
    assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={**body, "prompt": [5] * 10,
                                                           "max_tokens": CONTEXT}, headers=auth), 400)
    assert err["param"] == "max_tokens"
    huge = b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'
    r = httpx.post(url + "/v1/completions", content=huge, timeout=TIMEOUT,
                   headers={**auth, "Content-Type": "application/json"})
    _error(r, 413)
    assert httpx.get(url + "/health").status_code == 200          # the server survived all of it


def test_kv_policy_fields_through_extra_body_match_offline(server, offline):
    """issue 14's fields reach SamplingParams: a `sinks` request runs a prompt longer than the
    context (refused under `full`), equal to `LLM` with the same fields, on both endpoints."""
    client = _client(server)
    long_ids = [(7 * i) % 200 + 5 for i in range(CONTEXT + 40)]
    kv = {"kv_policy": "sinks", "kv_sinks": 2, "kv_window": 62}
    want = offline.generate({"prompt_token_ids": long_ids}, SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True, **kv))[0].outputs[0]
    got = client.completions.create(model=NAME, prompt=long_ids, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, **kv})
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(long_ids)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt=long_ids, max_tokens=5, **GREEDY)

    messages = [{"role": "user", "content": "Hello world, tell me more"}]
    kv = {"kv_policy": "window", "kv_window": 8}
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, **kv))[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True, **kv})
    assert got.choices[0].message.content == want.outputs[0].text


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, offline):
    client = _client(server)
    ids = [(11 * i) % 300 + 3 for i in range(CONTEXT + 100)]
    want = offline.generate({"prompt_token_ids": ids[-50:]}, SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    got = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True, "truncate_prompt_tokens": 50})
    assert got.usage.prompt_tokens == 50
    assert got.choices[0].text == offline.tokenizer.decode(ids[-50:]) + want.text


def test_bad_kv_policy_fields_are_400_naming_the_field(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2}
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [({"kv_policy": "bogus"}, "kv_policy"), ({"kv_policy": "window", "kv_window": 0}, "kv_window"),
             ({"kv_policy": "sinks", "kv_sinks": 8, "kv_window": 8}, "kv_sinks"),
             ({"kv_policy": "h2o", "kv_sinks": 1, "kv_window": 2, "kv_budget": 1}, "kv_budget"),
             ({"kv_policy": "sinks", "n": 2}, "n"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
             ({"kv_sinks": "many"}, "kv_sinks")]
    for route, base in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        for fields, param in cases:
            err = _error(httpx.post(url + route, json={**base, **fields}, headers=auth, timeout=TIMEOUT), 400)
            assert err["param"] == param and "\n" not in err["message"], (route, fields, err)
    assert httpx.get(url + "/health").status_code == 200


def test_tokenize_detokenize_and_metrics(server, offline):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=auth)
    ids = r.json()["tokens"]
    assert ids == offline.tokenizer.encode("Hello world", add_special_tokens=True)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=auth)
    assert r.json() == {"prompt": "Hello world"}
    _error(httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}, headers=auth), 400)
    info = httpx.get(server.url + "/tokenizer_info", headers=auth).json()     # lm-eval's remote tokenizer
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == offline.tokenizer.chat_template
    m = server.metrics()
    assert m["memlm:memory_budget_bytes"] == 2**30
    assert m['memlm:memory_plan_bytes{part="kv_pool"}'] > 0
    assert m["memlm:process_rss_bytes"] > 0
    assert m["memlm:prompt_tokens_total"] > 0 and m["memlm:generation_tokens_total"] >= 6
    assert m["memlm:time_to_first_token_seconds_count"] > 0
    assert m["memlm:e2e_request_latency_seconds_count"] > 0
    assert m["memlm:kv_cache_used_blocks"] == 0 and m["memlm:num_requests_running"] == 0


# ---- lifecycle ------------------------------------------------------------------------------
def _poll(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _long_stream(client: httpx.Client, max_tokens: int):
    return client.stream("POST", "/v1/completions", json={
        "model": NAME, "prompt": "The quick brown fox", "max_tokens": max_tokens, "stream": True,
        "ignore_eos": True, "temperature": 0}, timeout=TIMEOUT)


def _data_lines(lines, count: int) -> list[str]:
    """The next `count` SSE data payloads from `lines` (one `response.iter_lines()` per
    response: httpx closes the connection when an abandoned line iterator is collected)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
            if len(out) == count:
                break
    return out


def test_a_model_that_cannot_load_ends_the_server_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memlm", "serve", "--model", str(tmp_path / "missing"),
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0], proc.stderr


def test_health_was_503_while_loading(small):
    assert small.statuses[0] == 503 and small.statuses[-1] == 200
    assert small.api_while_loading and set(small.api_while_loading) == {(503, "loading")}


def test_disconnect_frees_blocks_at_once(small):
    with httpx.Client(base_url=small.url) as client:
        with _long_stream(client, CONTEXT - 16) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            _data_lines(lines, 3)
            busy = small.metrics()
            assert busy["memlm:kv_cache_used_blocks"] > 0 and busy["memlm:num_requests_running"] == 1
    m = _poll(lambda: (lambda m: m if m["memlm:kv_cache_used_blocks"] == 0 else None)(small.metrics()))
    assert m["memlm:num_requests_running"] == 0
    assert m['memlm:request_success_total{finished_reason="abort"}'] == 1
    assert m["memlm:generation_tokens_total"] < CONTEXT - 16


def test_full_waiting_queue_is_429(small):
    """One sequence runs, one request waits (--max-waiting 1): the next one gets 429."""
    with httpx.Client(base_url=small.url) as client:
        with _long_stream(client, CONTEXT - 16) as response:
            lines = response.iter_lines()
            _data_lines(lines, 2)
            waiting = {}
            t = threading.Thread(target=lambda: waiting.update(r=httpx.post(
                small.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
                timeout=TIMEOUT)))
            t.start()
            _poll(lambda: small.metrics()["memlm:num_requests_waiting"] == 1)
            r = httpx.post(small.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
            err = _error(r, 429)
            assert err["code"] == "queue_full" and r.headers["Retry-After"] == "1"
    t.join(TIMEOUT)             # the stream's disconnect let the waiting request run
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3


def test_sigterm_drains_in_flight_requests_then_exits_0(small, offline):
    with httpx.Client(base_url=small.url) as client:
        with _long_stream(client, 120) as response:
            lines = response.iter_lines()
            first = _data_lines(lines, 1)
            small.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:     # no new work once draining: refused, or 503 on an open connection
                assert httpx.get(small.url + "/health", timeout=5).status_code == 503
            except httpx.TransportError:
                pass
            rest = _data_lines(lines, 10**6)
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(d) for d in first + rest[:-1]]
    assert sum(1 for c in chunks if c["choices"]) >= 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    want = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=120,
                                                                    ignore_eos=True))[0].outputs[0]
    assert text == want.text          # the whole answer, not cut by the shutdown
    assert small.proc.wait(timeout=30) == 0, small.output()
