"""The public LLM API on a tiny random model: prompt forms, errors, chat, stream."""

import pytest

import engine_fakes as ef

from memlm import LLM, RequestOutput, SamplingParams
from memlm.errors import RequestError


@pytest.fixture(scope="module", params=["paged", "reference"])
def llm(request):
    kw = dict(num_kv_blocks=32) if request.param == "paged" else {}
    return LLM(ef.tiny_loaded(ef.llama_config()), engine=request.param, verbose=False, **kw)


def test_prompt_forms_and_output_shape(llm):
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate(["hi", {"prompt_token_ids": [104, 105]}], sp)
    assert [type(o) for o in out] == [RequestOutput, RequestOutput]
    assert out[0].prompt == "hi" and out[0].prompt_token_ids == [104, 105]
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids   # same tokens, same result
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].finished
    single = llm.generate("hi", sp)
    assert len(single) == 1 and single[0].outputs[0].text == out[0].outputs[0].text


@pytest.mark.parametrize("bad", ["", {"prompt_token_ids": []}, {"prompt_token_ids": [999999]}, {"x": 1}, 42])
def test_bad_prompts_raise_request_error(llm, bad):
    with pytest.raises(RequestError):
        llm.generate([bad], SamplingParams(max_tokens=2))


def test_sampling_params_list_must_match(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])
    out = llm.generate(["a", "b"], [SamplingParams(temperature=0, max_tokens=1),
                                    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    assert len(out[1].outputs[0].token_ids) == 3


def test_chat_and_stream_agree_with_generate(llm):
    conv = [{"role": "user", "content": "hello"}]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    chat = llm.chat(conv, sp)[0]
    assert chat.prompt.startswith("<user>hello")
    assert llm.chat([conv, conv], sp)[1].outputs[0].text == chat.outputs[0].text
    streamed = list(llm.stream(conv, sp))
    assert "".join(c.text for c in streamed) == chat.outputs[0].text
    with pytest.raises(RequestError):
        llm.chat([], sp)


def test_prompt_longer_than_context_errors_itself_only():
    cfg = ef.llama_config(max_position_embeddings=64)
    llm = LLM(ef.tiny_loaded(cfg), verbose=False, num_kv_blocks=32)
    out = llm.generate([{"prompt_token_ids": [1] * 80}, "ok"], SamplingParams(max_tokens=70, ignore_eos=True))
    assert out[0].error and out[0].outputs[0].finish_reason == "error"
    assert out[1].outputs[0].finish_reason == "length" and len(out[1].prompt_token_ids) + len(out[1].outputs[0].token_ids) == 64


def test_both_engines_implement_the_engine_protocol(llm):
    from memlm.engine.protocol import Engine
    assert isinstance(llm.engine, Engine)
    assert isinstance(llm.engine.describe_plan(), str)
    assert (llm.metrics is None) == (llm.engine.__class__.__name__ == "ReferenceEngine")


def test_reference_engine_refuses_a_memory_budget():
    with pytest.raises(ValueError, match="reference engine does not run inside a memory budget") as e:
        LLM(ef.tiny_loaded(ef.llama_config()), engine="reference", memory_budget="1GiB", verbose=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="engine must be one of"):
        LLM(ef.tiny_loaded(ef.llama_config()), engine="fast", verbose=False)


@pytest.mark.parametrize("kw, want", [({}, "fp32"), ({"weight_dtype": "bf16"}, "bf16"),
                                      ({"dtype": "bfloat16"}, "bf16"), ({"weight_dtype": "float32"}, "fp32"),
                                      ({"weight_dtype": "bf16", "dtype": "torch.bfloat16"}, "bf16")])
def test_weight_dtype_speaks_the_one_vocabulary(kw, want):
    import torch
    llm = LLM(ef.tiny_loaded(ef.llama_config()), engine="reference", verbose=False, **kw)
    assert llm.weight_dtype == want and llm.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[want]


@pytest.mark.parametrize("kw, match", [({"weight_dtype": "int2"}, "weight_dtype must be one of auto, fp32, bf16, int8, int4"),
                                       ({"weight_dtype": "fp32", "dtype": "bf16"}, "disagree")])
def test_bad_weight_dtype_is_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        LLM(ef.tiny_loaded(ef.llama_config()), engine="reference", verbose=False, **kw)
    assert "\n" not in str(e.value)


def test_stream_gives_deltas_per_completion_for_n_gt_1(llm):
    sp = SamplingParams(temperature=0.9, seed=5, n=3, max_tokens=7, ignore_eos=True)
    want = llm.generate("hey", sp)[0].outputs
    chunks = list(llm.stream("hey", sp))
    for i in range(3):
        mine = [c for c in chunks if c.index == i]
        assert "".join(c.text for c in mine) == want[i].text
        assert [t for c in mine for t in c.token_ids] == want[i].token_ids
        assert [c.finish_reason for c in mine][-1] == "length"
