"""AsyncLLM: concurrent requests finish with the same tokens as offline; cancellation frees KV."""
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import engine_fakes as ef  # noqa: E402
from engine_fakes import one_torch_thread  # noqa: E402,F401  (autouse)

from memlm import LLM, SamplingParams  # noqa: E402
from memlm.engine.async_engine import AsyncLLM  # noqa: E402


def test_concurrent_requests_and_cancellation():
    llm = LLM(ef.tiny_loaded(ef.llama_config()), verbose=False, num_kv_blocks=64, max_num_seqs=8)
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

    async def main():
        results = await asyncio.gather(*(one(p) for p in prompts), cancelled(prompts[0]))
        await asyncio.sleep(0.05)
        await engine.shutdown()
        return results[:-1]

    assert asyncio.run(main()) == offline
    assert llm.metrics.kv_blocks_used == 0 and not llm.engine.has_unfinished()
