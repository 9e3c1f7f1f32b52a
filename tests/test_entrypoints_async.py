"""AsyncLLM: concurrent requests finish with the same tokens as offline; cancellation frees KV;
the delta stream concatenates to the final snapshot."""
import asyncio

import engine_fakes as ef
import pytest

from memlm import LLM, SamplingParams
from memlm.entrypoints.async_llm import AsyncLLM
from memlm.errors import RequestError


@pytest.fixture(scope="module")
def llm():
    return LLM(ef.tiny_loaded(ef.llama_config()), verbose=False, num_kv_blocks=64, max_num_seqs=8)


def test_concurrent_requests_and_cancellation(llm):
    prompts = ef.random_prompts(6, 5, 60, seed=9)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    engine = AsyncLLM(llm)

    async def one(p):
        last = None
        async for out in engine.generate(p, sp):
            last = out
        return last.outputs[0].token_ids

    async def cancelled(p):
        async for out in engine.generate(p, SamplingParams(max_tokens=500, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 3:
                break               # the consumer goes away mid-generation
        return out.request_id

    async def main():
        results = await asyncio.gather(*(one(p) for p in prompts), cancelled(prompts[0]))
        # Wait for the engine loop to process the abort (bounded), not for a guessed time.
        await engine.wait_released(results[-1], timeout=30)
        await engine.shutdown()
        return results[:-1]

    assert asyncio.run(main()) == offline
    assert llm.metrics.kv_blocks_used == 0 and not llm.engine.has_unfinished()


def test_snapshots_are_cumulative_and_stream_gives_deltas(llm):
    """generate's snapshots grow and end as LLM.generate's output; stream's chunks (per
    completion, n=2) concatenate to the same text and tokens."""
    sp = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=9, ignore_eos=True, logprobs=1)
    want = llm.generate("hello", sp)[0]
    engine = AsyncLLM(llm)

    async def main():
        snaps = [out async for out in engine.generate("hello", sp)]
        chunks = [c async for c in engine.stream("hello", sp)]
        await engine.shutdown()
        return snaps, chunks

    snaps, chunks = asyncio.run(main())
    last = snaps[-1]
    assert last.finished and not any(s.finished for s in snaps[:-1])
    for i in range(2):
        lens = [len(s.outputs[i].token_ids) for s in snaps]
        assert lens == sorted(lens)
        assert last.outputs[i].token_ids == want.outputs[i].token_ids
        assert last.outputs[i].text == want.outputs[i].text
        assert last.outputs[i].logprobs == want.outputs[i].logprobs
        assert last.outputs[i].finish_reason == want.outputs[i].finish_reason == "length"
        mine = [c for c in chunks if c.index == i]
        assert "".join(c.text for c in mine) == want.outputs[i].text
        assert [t for c in mine for t in c.token_ids] == want.outputs[i].token_ids
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])


def test_failed_request_raises_in_stream_and_finishes_snapshot():
    llm = LLM(ef.tiny_loaded(ef.llama_config(max_position_embeddings=32)), verbose=False, num_kv_blocks=16)
    engine = AsyncLLM(llm)
    too_long = {"prompt_token_ids": [1] * 40}

    async def main():
        snaps = [out async for out in engine.generate(too_long)]
        with pytest.raises(RequestError):
            async for _ in engine.stream(too_long):
                pass
        await engine.shutdown()
        return snaps

    snaps = asyncio.run(main())
    assert snaps[-1].finished and snaps[-1].error and snaps[-1].outputs[0].finish_reason == "error"


def test_a_failing_step_ends_its_requests_with_the_error_and_the_loop_goes_on(llm):
    """A bug in one step must not leave consumers waiting forever (a server would hang)."""
    engine = AsyncLLM(llm)
    real_step, calls = llm.engine.step, []

    class Boom(RuntimeError):
        pass

    def step_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise Boom("injected")
        return real_step()

    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        failed = [out async for out in engine.generate("hello", sp)]
        ok = [out async for out in engine.generate("hello", sp)]
        await engine.shutdown()
        return failed[-1], ok[-1]

    import unittest.mock
    with unittest.mock.patch.object(llm.engine, "step", step_failing_once):
        failed, ok = asyncio.run(main())
    assert failed.finished and "injected" in failed.error
    assert ok.error is None and len(ok.outputs[0].token_ids) == 4
    assert llm.metrics.kv_blocks_used == 0
