"""The last stage's sampling parameters against transformers' logits processors (no mesh: pure).

stage_worker/sampler.py processes every row of a micro-batch at once; each parameter must do what
the transformers processor of that name does to the same logits (RepetitionPenalty, MinP,
MinNewTokensLength, SequenceBias for logit_bias, Temperature/TopK/TopP), presence and frequency
penalties what vLLM's formula does (transformers has no processor for them), and a row's result
must not depend on the other rows of its micro-batch. The end-to-end effect of each parameter
through the mesh is in tests/test_openai_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from gateway import validation
from stage_worker.sampler import Row, logprobs_of, process_logits, sample_rows
from stagemesh.sampling import SamplingSpec, sample_seed

V = 64
NEG = float("-inf")


@pytest.fixture
def logits():
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


def history(seed: int, n: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_repetition_penalty_is_transformers(logits):
    hist = [history(i, 12) for i in range(4)]
    rows = [Row(SamplingSpec(repetition_penalty=p), output_index=4, history=h, num_prompt=8)
            for p, h in zip((1.3, 0.7, 2.0, 1.0), hist)]
    ours = process_logits(logits, rows)
    for i, p in enumerate((1.3, 0.7, 2.0, 1.0)):
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([hist[i]]), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=0, atol=0)


def test_presence_and_frequency_count_outputs_only(logits):
    prompt, out = [3, 3, 5], [7, 7, 7, 9]
    spec = SamplingSpec(presence_penalty=0.5, frequency_penalty=0.25)
    ours = process_logits(logits[:1], [Row(spec, output_index=4, history=prompt + out, num_prompt=3)])[0]
    expect = logits[0].clone()
    expect[7] -= 0.5 + 3 * 0.25
    expect[9] -= 0.5 + 0.25  # prompt tokens 3 and 5 are not penalised (vLLM)
    torch.testing.assert_close(ours, expect)
    # A history longer than num_prompt + output_index (a step run again) counts only what is due.
    again = process_logits(logits[:1], [Row(spec, output_index=3, history=prompt + out, num_prompt=3)])[0]
    expect[9] += 0.5 + 0.25
    torch.testing.assert_close(again, expect)


def test_min_tokens_is_transformers(logits):
    spec = SamplingSpec(min_tokens=3, stop_token_ids=(2, 5))
    for produced in range(5):
        ours = process_logits(logits[:1], [Row(spec, output_index=produced)])
        ref = MinNewTokensLengthLogitsProcessor(10, 3, [2, 5])(torch.zeros(1, 10 + produced, dtype=torch.long),
                                                               logits[:1].clone())
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_logit_bias_is_transformers_sequence_bias(logits):
    bias = ((4, 7.5), (10, -100.0), (63, 0.25))
    ours = process_logits(logits[:1], [Row(SamplingSpec(logit_bias=bias))])
    ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])(torch.zeros(1, 3, dtype=torch.long),
                                                                   logits[:1].clone())
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_after_temperature_is_transformers(logits, min_p):
    spec = SamplingSpec(temperature=0.7, min_p=min_p, seed=1)
    ours = process_logits(logits[:1], [Row(spec)])
    ref = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(0.7)(None, logits[:1].clone()))
    torch.testing.assert_close(ours, ref)


def test_top_k_top_p_min_p_in_transformers_order(logits):
    spec = SamplingSpec(temperature=1.3, top_k=20, top_p=0.8, min_p=0.1, seed=1)
    ours = process_logits(logits[:1], [Row(spec)])
    ref = logits[:1].clone()
    for warper in (TemperatureLogitsWarper(1.3), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)):
        ref = warper(None, ref)
    torch.testing.assert_close(ours, ref)


def test_a_row_does_not_depend_on_its_neighbours(logits):
    """Every parameter at once in one batch: each row as if alone (tensor ops, no cross-talk)."""
    specs = [SamplingSpec(repetition_penalty=1.2, frequency_penalty=0.3, logit_bias=((1, 2.0),)),
             SamplingSpec(temperature=0.8, top_k=10, min_p=0.05, seed=5, presence_penalty=-0.5),
             SamplingSpec(min_tokens=2, stop_token_ids=(0,), temperature=1.0, top_p=0.9, seed=7),
             SamplingSpec()]
    rows = [Row(s, output_index=1, history=history(i, 6), num_prompt=5) for i, s in enumerate(specs)]
    batch = process_logits(logits, rows)
    for i, r in enumerate(rows):
        torch.testing.assert_close(batch[i : i + 1], process_logits(logits[i : i + 1], [r]), rtol=0, atol=0)
    drawn = sample_rows(logits, rows).tokens
    assert drawn == [sample_rows(logits[i : i + 1], [r]).tokens[0] for i, r in enumerate(rows)]
    assert drawn[0] == int(batch[0].argmax()) and drawn[3] == int(logits[3].argmax())


def test_logprobs_are_the_raw_log_softmax(logits):
    """Chosen token and top k from the raw logits: temperature and bias do not change them (vLLM)."""
    specs = [SamplingSpec(logprobs=3), SamplingSpec(temperature=2.0, seed=3, logprobs=0,
                                                    logit_bias=((5, 50.0),)), SamplingSpec(), SamplingSpec(logprobs=5)]
    drawn = sample_rows(logits, [Row(s) for s in specs])
    ref = torch.log_softmax(logits, -1)
    assert drawn.tokens[1] == 5 and drawn.logprobs[2] is None
    for i in (0, 1, 3):
        lp = drawn.logprobs[i]
        assert lp.token_id == drawn.tokens[i]
        assert abs(lp.logprob - ref[i, drawn.tokens[i]].item()) < 1e-6
        k = specs[i].logprobs
        top = ref[i].topk(k) if k else None
        assert lp.top_ids == ([] if not k else top.indices.tolist())
        torch.testing.assert_close(torch.tensor(lp.top_logprobs), top.values if k else torch.tensor([]))
    assert logprobs_of(logits, [0, 1, 2, 3], [None] * 4) == [None] * 4


def test_sample_seeds_are_distinct_and_stable():
    seeds = [sample_seed(7, i) for i in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and seeds == [sample_seed(7, i) for i in range(4)]
    assert sample_seed(None, 3) is None
    assert not SamplingSpec(repetition_penalty=1.1).plain_greedy and SamplingSpec(min_p=0.5).plain_greedy


LIMITS = validation.ModelLimits(model_id="m", vocab_size=100, max_model_len=256, kv_capacity_tokens=256)
BAD = [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=17), "min_tokens"),  # more than max_tokens (16)
    (dict(min_tokens=-1), "min_tokens"),
    (dict(logit_bias=((100, 1.0),)), "logit_bias"),
    (dict(logit_bias=((3, 101.0),)), "logit_bias"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(n=0), "n"),
    (dict(n=17), "n"),
]


@pytest.mark.parametrize("fields,name", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_ranges_are_checked_once_naming_the_field(fields, name):
    with pytest.raises(validation.FieldError) as info:
        validation.check_fields(validation.Fields(max_tokens=16, **fields), LIMITS)
    assert info.value.field == name and name in str(info.value)


def test_logit_bias_keys_are_token_ids():
    assert validation.parse_logit_bias({"5": 1, "2": -0.5}) == ((2, -0.5), (5, 1.0))
    with pytest.raises(validation.FieldError, match="logit_bias"):
        validation.parse_logit_bias({"five": 1})
    with pytest.raises(validation.FieldError, match="logit_bias"):
        validation.parse_logit_bias({"5": "a lot"})
