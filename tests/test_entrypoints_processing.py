"""The processing shared by LLM, AsyncLLM (and the server): prompt normalization and validation,
and deltas that concatenate to the final output, per completion. No model: tokens are fed to
the Request's sequences by hand, as an engine step would."""
import pytest
from engine_fakes import EOS, ByteTokenizer

from memlm.engine.request import RequestStatus
from memlm.entrypoints.processing import (OutputAccumulator, Processor, Prompt, RequestStream,
                                          is_conversation)
from memlm.errors import RequestError
from memlm.sampling import SamplingParams

PROC = Processor(ByteTokenizer(), vocab_size=260, eos_token_ids=(EOS,))


def feed(req, texts: dict[int, str], stream: RequestStream, steps: int):
    """Append one byte per unfinished completion per step (completion i writes texts[i]);
    returns the deltas taken after each step."""
    deltas = []
    for step in range(steps):
        for s in req.sequences:
            text = texts[s.index].encode()
            if not s.finished and step < len(text):
                if s.append_token(text[step]):
                    s.status = RequestStatus.FINISHED
        deltas.append(stream.take())
    return deltas


def test_prompt_forms_normalize_to_token_ids():
    assert PROC.prompt("hi") == Prompt("hi", [104, 105])
    assert PROC.prompt({"prompt": "hi"}) == Prompt("hi", [104, 105])
    assert PROC.prompt({"prompt_token_ids": [1, 2], "prompt": "x"}) == Prompt("x", [1, 2])
    chat = PROC.chat([{"role": "user", "content": "yo"}])
    assert chat.text == "<user>yo\n<assistant>" and chat.token_ids == list(chat.text.encode())
    assert PROC.one([{"role": "user", "content": "yo"}]) == chat
    assert is_conversation([{"role": "user"}]) and not is_conversation(["a", "b"])


@pytest.mark.parametrize("bad, match", [
    ("", "prompt 3 is empty"), ({"prompt_token_ids": []}, "prompt 3 is empty"),
    ({"prompt_token_ids": [260]}, r"token id 260 outside the vocabulary \[0, 260\)"),
    ({"x": 1}, "without 'prompt'"), (42, "must be a string")])
def test_bad_prompts_name_the_prompt_in_one_line(bad, match):
    with pytest.raises(RequestError, match=match) as e:
        PROC.prompt(bad, 3)
    assert "\n" not in str(e.value)


def test_bad_conversations_and_params():
    for bad in ([], [{"content": "no role"}], ["text"]):
        with pytest.raises(RequestError, match="conversation 0"):
            PROC.chat(bad)
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams"):
        PROC.make_request(PROC.prompt("a"), {"max_tokens": 3})
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        PROC.make_requests([PROC.prompt("a"), PROC.prompt("b")], [SamplingParams()])


def test_requests_get_unique_ids_and_shared_or_own_params():
    proc = Processor(ByteTokenizer(), 260)
    sp = [SamplingParams(max_tokens=1), SamplingParams(max_tokens=2)]
    reqs = proc.make_requests([proc.prompt("a"), proc.prompt("b")], sp)
    assert [r.request_id for r in reqs] == ["0", "1"] and [r.params for r in reqs] == sp
    again = proc.make_requests([proc.prompt("c")])
    assert again[0].request_id == "2" and again[0].params == SamplingParams()


def test_deltas_concatenate_to_the_final_text_with_stop_string_hold_back():
    req = PROC.make_request(PROC.prompt("p"), SamplingParams(stop=["END"], max_tokens=100))
    stream = RequestStream(req)
    deltas = feed(req, {0: "abcENxyzEND tail"}, stream, steps=20)
    chunks = [c for d in deltas if d is not None for c in d.chunks]
    assert req.sequences[0].completion.text == "abcENxyz"
    assert "".join(c.text for c in chunks) == "abcENxyz"
    assert [t for c in chunks for t in c.token_ids] == list(b"abcENxyzEND")
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == "END"
    assert [d is None for d in deltas[11:]] == [True] * 9       # nothing after the last chunk
    assert deltas[10].finished and not any(d.finished for d in deltas[:10])
    # "E", "EN" were held back while they could still start "END"; their tokens were not
    assert [c.text for c in chunks[3:5]] == ["", ""] and chunks[3].token_ids == [ord("E")]


def test_deltas_per_completion_for_n_gt_1_rebuild_the_output():
    req = PROC.make_request(PROC.prompt("p"), SamplingParams(n=2, max_tokens=100, logprobs=0))
    stream, acc = RequestStream(req), OutputAccumulator(req)
    texts = {0: "hé", 1: "longer"}
    snapshots = [acc.add(d) for d in feed(req, texts, stream, steps=3) if d is not None]
    assert snapshots[-1].outputs[0].text == "hé" and snapshots[-1].outputs[1].text == "lon"
    for s in req.sequences:                   # finish both as an engine would
        s.completion.finish("length")
        s.status = RequestStatus.FINISHED
    last = stream.take()
    assert last.finished and sorted(c.index for c in last.chunks) == [0, 1]
    assert all(c.finish_reason == "length" for c in last.chunks)
    final = acc.add(last)
    assert final == req.to_output()
    assert snapshots[0].outputs[0].text == "h"              # earlier snapshots are not mutated
    assert stream.take() is None and stream.done


def test_failed_request_gives_one_final_delta_with_the_error():
    req = PROC.make_request(PROC.prompt("p"), SamplingParams(n=2))
    stream = RequestStream(req)
    req.fail("too long")
    d = stream.take()
    assert d.finished and d.error == "too long" and [c.finish_reason for c in d.chunks] == ["error"] * 2
    assert OutputAccumulator(req).add(d) == req.to_output()
