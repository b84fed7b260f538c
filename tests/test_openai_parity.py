"""What vLLM's OpenAI server takes, through the real mesh, against transformers on the same checkpoint.

One mesh for the module (coordinator, two stage workers and the gateway with --http-port, as
separate processes; the demo checkpoint with a ChatML template): log-probabilities (gRPC, completions,
chat, streaming, echo's prompt log-probabilities) equal transformers' log_softmax of its logits at
1e-4; n samples are seeded per sample and share the prompt's KV blocks; each sampling parameter
changes greedy output exactly as transformers' generate (or vLLM's formula) says; several prompts
in one request; the utility endpoints; max_model_len as the KV pool holds it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
import requests
import torch

from stagemesh.cli.demo_model import write_demo_model
from stagemesh.cli.harness import wait_kv_free
from stagemesh.client import build_request
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from tests.meshes import openai_mesh, peak_kv_blocks, with_chat_template
from tests.test_http_api import CHATML, MESSAGES

KV_BLOCKS, BLOCK = 256, 4  # the harness' block size; 1,024 tokens per replica < the model's 2,048
PROMPT_IDS = [5, 61, 300, 12, 91, 7, 44, 230, 18, 9, 150, 33]
EOS = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return with_chat_template(write_demo_model(tmp_path_factory.mktemp("demo")), CHATML)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mesh(model_dir):
    with openai_mesh(model_dir, stages=2, kv_blocks=KV_BLOCKS) as m:
        m["channel"] = grpc.insecure_channel(m["gateway"])
        m["stub"] = pb_grpc.GenerationStub(m["channel"])
        m["model"] = m["stub"].ListModels(pb.ListModelsRequest(), timeout=10).models[0].id
        yield m
        m["channel"].close()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[T, V]: row t is transformers' log_softmax at position t (predicting token t + 1)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def hf_generate(hf, ids: list[int], n: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=EOS, **kwargs)
    return out[0, len(ids):].tolist()


def grpc_stream(mesh, n: int = 1, **sampling) -> list[pb.GenerateResponse]:
    req = build_request(prompt_ids=PROMPT_IDS, max_tokens=sampling.pop("max_tokens", 8), temperature=0.0,
                        ignore_eos=True)
    for k, v in sampling.items():
        setattr(req.sampling, k, v)
    if n != 1:
        req.n = n
    return list(mesh["stub"].Generate(req, timeout=60))


def close(a, b, tol: float = 1e-4) -> bool:
    """Same length, each value within tol (a prompt computed cold or from the prefix cache, or in
    another batch, differs in the last float32 bits)."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(abs(x - y) < tol for x, y in zip(a, b))


def assert_entry(entry, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - ref_row[token].item()) < 1e-4
    top = ref_row.topk(k)
    assert list(entry.top_token_ids) == top.indices.tolist()
    assert max(abs(a - b) for a, b in zip(entry.top_logprobs, top.values.tolist())) < 1e-4


# --- log-probabilities ------------------------------------------------------------------------------


def test_grpc_logprobs_equal_transformers(mesh, hf):
    msgs = grpc_stream(mesh, logprobs=4, prompt_logprobs=3)
    out = [t for m in msgs for t in m.token_ids]
    entries = [e for m in msgs for e in m.logprobs]
    assert len(out) == len(entries) == 8
    ref = hf_logprobs(hf, PROMPT_IDS + out)
    P = len(PROMPT_IDS)
    for i, (tok, e) in enumerate(zip(out, entries)):
        assert_entry(e, ref[P - 1 + i], tok, 4)
    assert out == ref[P - 1 :].argmax(-1).tolist()[:8]  # greedy: the arg-max of the same distribution
    first = msgs[0]
    assert list(first.prompt_token_ids) == PROMPT_IDS and len(first.prompt_logprobs) == P - 1
    for pos, e in enumerate(first.prompt_logprobs, start=1):  # computed in full: no cached prefix
        assert_entry(e, ref[pos - 1], PROMPT_IDS[pos], 3)


def test_completions_logprobs_echo_and_stream(mesh, hf):
    c, P = mesh["client"], len(PROMPT_IDS)
    kw = dict(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=3)
    plain = c.completions.create(**kw).choices[0]
    echo = c.completions.create(echo=True, **kw).choices[0]
    out_ids = [t for m in grpc_stream(mesh, max_tokens=6) for t in m.token_ids]
    ref = hf_logprobs(hf, PROMPT_IDS + out_ids)
    want = [ref[P - 1 + i, t].item() for i, t in enumerate(out_ids)]
    lp = plain.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want)) < 1e-4
    for i, top in enumerate(lp.top_logprobs):
        values = sorted(top.values(), reverse=True)[:3]  # the chosen one may be a 4th entry
        assert max(abs(a - b) for a, b in zip(values, ref[P - 1 + i].topk(3).values.tolist())) < 1e-4
    # echo: the prompt's tokens first (the first has none), then the completion's; text likewise
    e = echo.logprobs
    assert len(e.tokens) == P + 6 and e.token_logprobs[0] is None and e.top_logprobs[0] is None
    prompt_want = [ref[i - 1, PROMPT_IDS[i]].item() for i in range(1, P)]
    assert max(abs(a - b) for a, b in zip(e.token_logprobs[1:P], prompt_want)) < 1e-4
    assert max(abs(a - b) for a, b in zip(e.token_logprobs[P:], want)) < 1e-4 and echo.text.endswith(plain.text)
    assert echo.text == requests.post(mesh["base"] + "/detokenize", json={"tokens": PROMPT_IDS},
                                      timeout=10).json()["prompt"] + plain.text
    chunks = [ch for ch in c.completions.create(stream=True, **kw) if ch.choices]
    streamed = [v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert close(streamed, lp.token_logprobs) and "".join(ch.choices[0].text for ch in chunks) == plain.text


def test_echo_logprobs_reach_every_sample(mesh, hf):
    """echo + logprobs with n > 1 and best_of: only the first sample computes the prompt (the
    others fork its blocks), yet every choice carries the prompt's log-probabilities, streamed too."""
    c, P = mesh["client"], len(PROMPT_IDS)
    ref = hf_logprobs(hf, PROMPT_IDS)
    prompt_want = [ref[i - 1, PROMPT_IDS[i]].item() for i in range(1, P)]
    kw = dict(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=4, temperature=1.0, seed=3, logprobs=1, echo=True)
    for extra in (dict(n=3), dict(n=2, best_of=4)):
        choices = c.completions.create(**kw, **extra).choices
        assert len(choices) == extra["n"]
        for ch in choices:
            lp = ch.logprobs
            assert len(lp.tokens) == P + 4 and lp.token_logprobs[0] is None
            assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:P], prompt_want)) < 1e-4
            assert lp.text_offset[P] == sum(len(t) for t in lp.tokens[:P])  # the completion after the prompt
    firsts: dict[int, list] = {}
    for chunk in c.completions.create(stream=True, n=2, **kw):
        for ch in chunk.choices:
            if ch.logprobs and ch.index not in firsts:
                firsts[ch.index] = ch.logprobs.token_logprobs
    assert sorted(firsts) == [0, 1]
    for values in firsts.values():
        assert values[0] is None and max(abs(a - b) for a, b in zip(values[1:P], prompt_want)) < 1e-4


@pytest.mark.parametrize("endpoint,body,param", [
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"skip_special_tokens": False}, "skip_special_tokens"),
    ("completions", {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ("completions", {"prompt_logprobs": 2}, "prompt_logprobs"),
    ("chat/completions", {"best_of": 2}, "best_of"),
    ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
])
def test_fields_without_effect_here_are_refused_not_ignored(mesh, endpoint, body, param):
    base = {"model": "", "max_tokens": 2}
    base.update({"messages": MESSAGES} if endpoint.startswith("chat") else {"prompt": "hi"})
    r = requests.post(f"{mesh['base']}/v1/{endpoint}", json={**base, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # their no-op values, and fields unknown to both APIs, are accepted
    ok = requests.post(f"{mesh['base']}/v1/{endpoint}", json={**base, "skip_special_tokens": True,
                                                               "use_beam_search": False, "user": "u1"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_chat_logprobs_equal_transformers(mesh, hf, model_dir):
    from transformers import AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    kw = dict(model=mesh["model"], messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    choice = mesh["client"].chat.completions.create(**kw).choices[0]
    content = choice.logprobs.content
    assert len(content) == 5
    out = [t for m in mesh["stub"].Generate(build_request(prompt_ids=ids, max_tokens=5), timeout=60)
           for t in m.token_ids]
    ref = hf_logprobs(hf, ids + out)
    for i, item in enumerate(content):
        row = ref[len(ids) - 1 + i]
        assert abs(item.logprob - row[out[i]].item()) < 1e-4
        assert close([t.logprob for t in item.top_logprobs], row.topk(2).values.tolist())
        assert item.bytes == list(item.token.encode("utf-8"))
    stream = mesh["client"].chat.completions.create(stream=True, **kw)
    streamed = [x.logprob for ch in stream if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert close(streamed, [x.logprob for x in content])


# --- n, best_of, several prompts ----------------------------------------------------------------------


def test_n_samples_are_seeded_each_and_share_the_prompt_blocks(mesh):
    prompt = list(range(10, 210))  # 50 blocks; 3 separate copies need at least 150
    kw = dict(model=mesh["model"], prompt=prompt, max_tokens=60, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    with peak_kv_blocks(mesh, every_s=0.01) as peak:
        first = mesh["client"].completions.create(n=3, **kw)
    again = mesh["client"].completions.create(n=3, **kw)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(first.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) == 3  # each sample its own seed
    assert texts[0] == mesh["client"].completions.create(n=1, **kw).choices[0].text  # sample 0: the seed itself
    assert first.usage.prompt_tokens == 200 and first.usage.completion_tokens == 180
    shared_bound = (200 - 1) // BLOCK + 3 * (math.ceil(260 / BLOCK) - (200 - 1) // BLOCK)
    assert 50 <= peak[0] <= shared_bound < 3 * 50, peak[0]


def test_best_of_keeps_the_most_likely(mesh):
    kw = dict(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=6, temperature=1.0, seed=3, logprobs=0)
    three = mesh["client"].completions.create(n=3, **kw).choices
    best = mesh["client"].completions.create(n=1, best_of=3, **kw).choices
    total = {ch.text: sum(ch.logprobs.token_logprobs) for ch in three}
    assert len(best) == 1 and best[0].index == 0 and best[0].text == max(total, key=total.get)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        mesh["client"].completions.create(n=2, best_of=1, **kw)


def test_several_prompts_in_one_request(mesh):
    c, kw = mesh["client"], dict(model=mesh["model"], max_tokens=5, temperature=0)
    one = c.completions.create(prompt="The old mill", **kw)
    two = c.completions.create(prompt=[5, 6, 7], **kw)
    both = c.completions.create(prompt=["The old mill", "A river"], n=2, **kw)
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == one.choices[0].text  # greedy: n copies
    river = c.completions.create(prompt="A river", **kw)
    assert both.choices[2].text == river.choices[0].text
    assert both.usage.prompt_tokens == one.usage.prompt_tokens + river.usage.prompt_tokens
    assert both.usage.completion_tokens == 20
    ids = c.completions.create(prompt=[[5, 6, 7], [8, 9]], **kw)
    assert ids.choices[0].text == two.choices[0].text and len(ids.choices) == 2
    chunks = list(c.completions.create(prompt=["The old mill", "A river"], stream=True, **kw))
    by_index = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {0: one.choices[0].text, 1: river.choices[0].text}


def test_grpc_n_streams_tagged_by_index(mesh):
    msgs = grpc_stream(mesh, n=2, max_tokens=4, logprobs=0)
    by = {}
    for m in msgs:
        by.setdefault(m.index, []).extend(m.token_ids)
    assert sorted(by) == [0, 1] and by[0] == by[1] and len(by[0]) == 4  # greedy
    assert sum(bool(m.finish_reason) for m in msgs) == 2


# --- sampling parameters: their effect, against transformers ------------------------------------------


def completion_ids(mesh, prompt_ids, max_tokens: int, **extra) -> tuple[list[int], str]:
    """Token ids and finish reason of a greedy request over gRPC (stagemesh.client.build_request's extras)."""
    req = build_request(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=0.0, **extra)
    msgs = list(mesh["stub"].Generate(req, timeout=60))
    return [t for m in msgs for t in m.token_ids], msgs[-1].finish_reason


def test_repetition_penalty_equals_transformers_generate(mesh, hf):
    ids, _ = completion_ids(mesh, PROMPT_IDS, 16, repetition_penalty=1.5)
    assert ids == hf_generate(hf, PROMPT_IDS, 16, repetition_penalty=1.5)
    assert ids != completion_ids(mesh, PROMPT_IDS, 16)[0]


def test_logit_bias_and_min_tokens_equal_transformers_generate(mesh, hf):
    ids, finish = completion_ids(mesh, PROMPT_IDS, 12, logit_bias={EOS: 30.0})
    assert ids == [EOS] and finish == pb.FINISH_REASON_STOP  # the bias makes EOS the arg-max at once
    ids, finish = completion_ids(mesh, PROMPT_IDS, 12, logit_bias={EOS: 30.0}, min_tokens=4)
    assert ids == hf_generate(hf, PROMPT_IDS, 12, sequence_bias={(EOS,): 30.0}, min_new_tokens=4)
    assert len(ids) == 5 and ids[-1] == EOS and EOS not in ids[:-1] and finish == pb.FINISH_REASON_STOP


def test_presence_and_frequency_penalties_follow_vllm(mesh, hf):
    """Greedy with the penalties equals a greedy loop over transformers' logits with vLLM's formula
    (negative: repeats are rewarded, so the effect shows within a few tokens)."""
    plain = completion_ids(mesh, PROMPT_IDS, 10)[0]
    for kind in ("presence_penalty", "frequency_penalty"):
        ids, _ = completion_ids(mesh, PROMPT_IDS, 10, **{kind: -2.0})
        seq, out = list(PROMPT_IDS), []
        for _ in range(10):
            with torch.no_grad():
                logits = hf(torch.tensor([seq])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits += 2.0 * ((counts > 0).float() if kind == "presence_penalty" else counts)
            out.append(int(logits.argmax()))
            seq.append(out[-1])
        assert ids == out and ids != plain, kind


def test_stop_token_ids_and_min_p(mesh):
    greedy, _ = completion_ids(mesh, PROMPT_IDS, 10)
    stop = greedy[3]
    ids, finish = completion_ids(mesh, PROMPT_IDS, 10, stop_token_ids=[stop])
    assert ids == greedy[: greedy.index(stop) + 1] and finish == pb.FINISH_REASON_STOP
    # min_p = 1 keeps only the most likely token: a seeded draw at temperature 1 is greedy.
    sampled = mesh["client"].completions.create(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=10,
                                                temperature=1.0, seed=5, extra_body={"min_p": 1.0,
                                                                                     "ignore_eos": True})
    plain = mesh["client"].completions.create(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert sampled.choices[0].text == plain.choices[0].text


HTTP_ERRORS = [
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(logit_bias={"999999": 1}), "logit_bias"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"),  # max_tokens 4
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(extra_body={"stop_token_ids": [10 ** 6]}), "stop_token_ids"),
    (dict(best_of=2, stream=True), "best_of"),
    (dict(prompt=["a"] * 5, n=16), "n"),  # 80 sequences in one request
]


@pytest.mark.parametrize("kwargs,field", HTTP_ERRORS, ids=[f for _, f in HTTP_ERRORS])
def test_bad_values_are_400_naming_the_field(mesh, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        mesh["client"].completions.create(**{"model": mesh["model"], "prompt": "hi", "max_tokens": 4, **kwargs})
    assert field in info.value.body["message"] and info.value.body["param"] == field


def test_top_logprobs_needs_logprobs(mesh):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        mesh["client"].chat.completions.create(model=mesh["model"], messages=MESSAGES, max_tokens=2, top_logprobs=2)


# --- endpoints and limits ---------------------------------------------------------------------------


def test_utility_endpoints(mesh):
    base = mesh["base"]
    assert requests.get(base + "/version", timeout=10).json()["version"]
    tok = requests.post(base + "/tokenize", json={"prompt": "The old mill"}, timeout=10).json()
    used = mesh["client"].completions.create(model=mesh["model"], prompt="The old mill", max_tokens=1)
    assert tok["count"] == len(tok["tokens"]) == used.usage.prompt_tokens
    assert requests.post(base + "/detokenize", json={"tokens": tok["tokens"]}, timeout=10).json()["prompt"].endswith(
        "The old mill")
    chat = requests.post(base + "/tokenize", json={"messages": MESSAGES}, timeout=10).json()
    assert chat["count"] > tok["count"] and chat["max_model_len"] == KV_BLOCKS * BLOCK
    assert requests.post(base + "/detokenize", json={"tokens": [10 ** 6]}, timeout=10).status_code == 400
    metrics = requests.get(base + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "stagemesh_ttft_seconds" in metrics.text


def test_max_model_len_is_what_the_kv_pool_holds(mesh):
    """The demo model says 2,048 positions; each replica's pool holds 256 blocks of 4 tokens."""
    assert mesh["client"].models.list().data[0].max_model_len == KV_BLOCKS * BLOCK
    assert mesh["stub"].ListModels(pb.ListModelsRequest(), timeout=10).models[0].max_model_len == KV_BLOCKS * BLOCK
    with pytest.raises(openai.BadRequestError, match="context"):
        mesh["client"].completions.create(model=mesh["model"], prompt=PROMPT_IDS, max_tokens=KV_BLOCKS * BLOCK)


def test_abandoned_samples_and_prompts_free_their_kv(mesh):
    """A client gone mid-stream (or timed out) cancels every sample of every prompt."""
    kw = dict(model=mesh["model"], max_tokens=300, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    stream = mesh["client"].completions.create(prompt=["The old mill", "A river"], n=3, stream=True, **kw)
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    wait_kv_free(mesh, 5.0, sequences=True)
    with pytest.raises(openai.APITimeoutError):
        mesh["client"].completions.create(prompt=["The old mill", "A river"], n=2, timeout=0.5, **kw)
    wait_kv_free(mesh, 5.0, sequences=True)


def test_penalties_and_logprobs_survive_preemption(mesh):
    """Six requests that outgrow the pool together: some are preempted and recomputed from their
    token history (the last stage gets the history again); each still equals itself run alone."""
    def replays() -> float:
        text = requests.get(mesh["base"] + "/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("stagemesh_replays_total"))

    prompts = [[(7 * i + j) % 700 + 3 for j in range(100)] for i in range(6)]
    kw = dict(max_tokens=100, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=1)
    before = replays()
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: grpc_collect(mesh, build_request(prompt_ids=p, **kw)), prompts))
    assert replays() > before  # 6 x 200 tokens need 300 blocks of 4; the pool has 256
    for p, (ids, lps) in zip(prompts, together):
        alone_ids, alone_lps = grpc_collect(mesh, build_request(prompt_ids=p, **kw))
        assert ids == alone_ids and len(lps) == len(ids) == 100
        assert close([e.logprob for e in lps], [e.logprob for e in alone_lps])


def grpc_collect(mesh, req) -> tuple[list[int], list]:
    msgs = list(mesh["stub"].Generate(req, timeout=120))
    return [t for m in msgs for t in m.token_ids], [e for m in msgs for e in m.logprobs]
