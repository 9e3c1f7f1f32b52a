"""LLMEngine's wiring of the KV cache manager: per-engine sequence ids and the usage figures."""
import engine_fakes as ef

from memlm.engine.config import EngineConfig
from memlm.engine.llm_engine import LLMEngine
from memlm.engine.request import Request
from memlm.sampling import SamplingParams


def engine(loaded, **kw):
    return LLMEngine(loaded.model, EngineConfig(max_num_seqs=4, num_kv_blocks=32, **kw))


def request(rid, prompt_len, n=1, max_tokens=4):
    return Request(rid, None, list(range(1, prompt_len + 1)),
                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n),
                   ef.ByteTokenizer())


def test_sequence_ids_are_numbered_per_engine():
    loaded = ef.tiny_loaded(ef.llama_config())
    e1, e2 = engine(loaded), engine(loaded)
    a, b = request("a", 5, n=2), request("b", 3)
    assert [s.seq_id for s in a.sequences] == [None, None]   # no ids until an engine accepts it
    e1.add_request(a), e1.add_request(b)
    c = request("c", 4)
    e2.add_request(c)
    assert [s.seq_id for s in a.sequences + b.sequences] == [0, 1, 2]
    assert [s.seq_id for s in c.sequences] == [0]            # a second engine starts from 0


def test_metrics_read_the_kv_manager():
    loaded = ef.tiny_loaded(ef.llama_config())
    eng = engine(loaded, block_size=16)
    eng.add_request(request("a", 20, n=2, max_tokens=8))
    eng.step()                                   # 20 prompt tokens computed: blocks 0, 1
    m = eng.metrics
    assert (m.num_kv_blocks, m.block_size, m.kv_blocks_used, m.kv_blocks_free) == (32, 16, 2, 30)
    assert m.fragmentation == eng.kv.fragmentation(eng.scheduler.running) == 1 - 20 / 32
    while eng.has_unfinished():
        eng.step()
    m = eng.metrics
    assert (m.kv_blocks_used, m.fragmentation) == (0, 0.0) and 0 < m.mean_fragmentation < 1


def test_runner_gather_cap_default_is_the_engine_default():
    import inspect

    from memlm.engine.runner import ModelRunner
    default = inspect.signature(ModelRunner).parameters["gather_cap_tokens"].default
    assert default == EngineConfig().gather_cap_tokens
