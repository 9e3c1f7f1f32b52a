import pytest
import torch

from memlm.sampling import SampleRow, Sampler, SamplingParams, make_generator


@pytest.mark.parametrize("kwargs, word", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(stop=[""]), "stop"), (dict(logprobs=-1), "logprobs"),
])
def test_invalid_params_raise_value_error_naming_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_stop_string_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []


def rows_for(params, n, seed0=0):
    return [SampleRow(params, make_generator(seed0 + i)) for i in range(n)]


def test_greedy_and_degenerate_truncations_pick_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    want = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
              SamplingParams(min_p=1.0)):
        assert Sampler()(logits, rows_for(p, 6)).token_ids == want


def test_top_k_restricts_support():
    logits = torch.arange(10.0)[None].repeat(200, 1)
    out = Sampler()(logits, rows_for(SamplingParams(top_k=3), 200)).token_ids
    assert set(out) <= {7, 8, 9} and len(set(out)) == 3


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(300, 1)
    out = Sampler()(logits, rows_for(SamplingParams(top_p=0.75), 300)).token_ids
    assert set(out) == {0, 1}


def test_seeded_rows_are_batch_independent():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    mixed = [SamplingParams(temperature=0.8, top_p=0.9, seed=i) if i % 2 else SamplingParams(temperature=0)
             for i in range(8)]
    batch = Sampler(chunk_rows=3)(logits,
                                  [SampleRow(p, make_generator(p.seed)) for p in mixed]).token_ids
    alone = [Sampler()(logits[i:i + 1], [SampleRow(p, make_generator(p.seed))]).token_ids[0]
             for i, p in enumerate(mixed)]
    assert batch == alone


def test_penalties_discourage_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    row = SampleRow(p, make_generator(0), prompt_token_ids=[0])
    assert Sampler()(logits, [row]).token_ids == [1]
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    row = SampleRow(p, make_generator(0), output_token_ids=[0])
    assert Sampler()(logits, [row]).token_ids == [1]


def test_logprobs_contain_sampled_and_top_n():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    out = Sampler()(logits, [SampleRow(SamplingParams(temperature=0, logprobs=2), make_generator(0))])
    lp = out.logprobs[0]
    assert set(lp) == {0, 1}
    assert lp[0] == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())
