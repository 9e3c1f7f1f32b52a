"""Stop conditions and streaming hold-back, with a byte-level tokenizer (one byte per token)."""

from engine_fakes import EOS, ByteTokenizer

from memlm.engine.detokenizer import CompletionState
from memlm.sampling import SamplingParams

TOK = ByteTokenizer()


def feed(state, text, stream=False):
    chunks = []
    for b in text.encode("utf-8"):
        done = state.add_token(b)
        if stream:
            chunks.append(state.take_new_text())
        if done:
            break
    return chunks


def test_stop_string_spanning_tokens_is_cut_and_held_back_in_stream():
    st = CompletionState(0, TOK, SamplingParams(stop=["END"], max_tokens=100), (EOS,), [])
    chunks = feed(st, "abcENxyzEND tail", stream=True)
    assert st.finish_reason == "stop" and st.stop_reason == "END"
    assert st.text == "abcENxyz"
    assert "".join(chunks) == "abcENxyz"
    # "E" and "EN" were held back until they could no longer start "END"
    assert chunks[:5] == ["a", "b", "c", "", ""]


def test_multibyte_utf8_is_emitted_whole():
    st = CompletionState(0, TOK, SamplingParams(max_tokens=100), (EOS,), [])
    chunks = feed(st, "é🙂", stream=True)
    assert [c for c in chunks if c] == ["é", "🙂"]
    assert st.text == "é🙂" and st.finish_reason is None


def test_eos_and_stop_token_ids_and_length():
    st = CompletionState(0, TOK, SamplingParams(max_tokens=100), (EOS,), [])
    st.add_token(ord("a"))
    assert st.add_token(EOS) and st.finish_reason == "stop" and st.text == "a"
    st = CompletionState(0, TOK, SamplingParams(max_tokens=100, ignore_eos=True), (EOS,), [])
    assert not st.add_token(EOS)
    st = CompletionState(0, TOK, SamplingParams(stop_token_ids=[ord("x")]), (EOS,), [])
    assert st.add_token(ord("x")) and st.stop_reason == ord("x")
    st = CompletionState(0, TOK, SamplingParams(max_tokens=2), (EOS,), [])
    feed(st, "abc")
    assert st.finish_reason == "length" and st.token_ids == [97, 98]


def test_earliest_stop_string_wins_and_can_be_kept():
    p = SamplingParams(stop=["cd", "bcde"], include_stop_str_in_output=True, max_tokens=50)
    st = CompletionState(0, TOK, p, (EOS,), [])
    feed(st, "abcdef")
    assert st.text == "abcd" and st.stop_reason == "cd"
