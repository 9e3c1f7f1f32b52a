"""Structured output (`SamplingParams.structured_output`, llguidance token masks): answers parse
and validate against their schema, greedy and sampled, n > 1, on the paged engine and the
reference oracle alike; a bad schema is that request's error."""
import json

import jsonschema
import pytest
from helpers import make_tiny_hf_llama

from memlm import LLM, SamplingParams
from memlm.errors import RequestError
from memlm.structured import StructuredOutput

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "name"],
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                         "name": {"type": "string", "maxLength": 6}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("tiny"))


def _llm(model_dir, engine):
    kwargs = {} if engine == "reference" else {"max_num_seqs": 4, "num_kv_blocks": 64}
    return LLM(str(model_dir), weight_dtype="fp32", verbose=False, engine=engine, **kwargs)


def test_outputs_parse_and_validate_on_both_engines(model_dir):
    so = StructuredOutput(json_schema=SCHEMA)
    params = [SamplingParams(temperature=0, max_tokens=64, structured_output=so),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=64, structured_output=so),
              SamplingParams(temperature=0, max_tokens=64, structured_output=StructuredOutput())]
    results, llms = {}, {}
    for engine in ("paged", "reference"):
        llms[engine] = _llm(model_dir, engine)
        outs = llms[engine].generate(["Hello world", "The quick", "memlm runs"], params)
        for o in outs[:2]:
            for c in o.outputs:
                assert c.finish_reason == "stop", c
                jsonschema.validate(json.loads(c.text), SCHEMA)
        assert isinstance(json.loads(outs[2].outputs[0].text), dict)      # json_object: any object
        results[engine] = [[c.token_ids for c in o.outputs] for o in outs]
    assert results["paged"] == results["reference"]
    # Without the mask the same greedy request is not JSON: the mask did the work.
    free = llms["paged"].generate("Hello world", SamplingParams(temperature=0, max_tokens=20))
    with pytest.raises(ValueError):
        json.loads(free[0].outputs[0].text)


def test_bad_schema_is_a_request_error(model_dir):
    llm = _llm(model_dir, "paged")
    with pytest.raises(RequestError, match="invalid JSON schema"):
        llm.generate("x", SamplingParams(structured_output=StructuredOutput(json_schema={"type": "nonsense"})))
    with pytest.raises(ValueError, match="structured_output"):
        SamplingParams(structured_output={"type": "object"})


def test_a_token_that_breaks_the_grammar_finishes_only_its_completion(model_dir):
    """Only a token sampled without the mask can; the engine frees that sequence, not the step."""
    llm = _llm(model_dir, "paged")
    prompt = llm.processor.prompt("Hello")
    req = llm.processor.make_request(prompt, SamplingParams(n=2, structured_output=StructuredOutput()))
    seq = req.sequences[0]
    not_json = llm.tokenizer.encode("x")[0]
    assert seq.append_token(not_json) is True
    assert seq.completion.finish_reason == "error" and "does not fit" in req.error
    assert req.sequences[1].completion.finish_reason is None
    brace = llm.tokenizer.encode("{")[0]
    assert req.sequences[1].append_token(brace) is False       # a valid start goes on
