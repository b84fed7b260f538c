"""Stage model, paged attention, loader, sampler and demo model against transformers itself.

Each checkpoint is written by transformers (tests/checkpoints.py) and run through 1, 2 and 3 of
our stages with chunked prefill, non-contiguous block tables and mixed micro-batches (some
sequences prefilling mid-prompt while others decode); logits and greedy tokens must match HF.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage_worker.attention import AttnMetadata
from stage_worker.kv_cache import PagedKVCache
from stage_worker.loader import load_stage
from stage_worker.sampler import SamplingSpec, sample
from stagemesh.cli.demo_model import write_demo_model
from stagemesh.errors import CheckpointError, InvalidArgument
from tests.checkpoints import make_hf_checkpoint
from tests.reference import hf_reference

SPLITS = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}
BLOCK, CHUNK, NEW_TOKENS = 4, 5, 6


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def check_against_hf(path, stages, prompts, new_tokens: int = NEW_TOKENS) -> None:
    """The stages' greedy tokens and logits rows equal transformers' on the checkpoint at `path`."""
    tokens, rows = run_pipeline(stages, prompts, new_tokens)
    for prompt, toks, ours in zip(prompts, tokens, rows):
        hf_new, ref = hf_reference(path, prompt, new_tokens)  # hf_new may stop early at eos
        assert toks[:len(hf_new)] == hf_new
        n = min(len(ours), len(ref))  # the rows of the shared prefix (all of them unless eos)
        torch.testing.assert_close(ours[:n], ref[:n], atol=1e-4, rtol=1e-4)


def run_pipeline(stages, prompts, new_tokens, chunk=CHUNK, block=BLOCK):
    """Greedy-generate for all prompts at once; returns (tokens per seq, logits rows per seq).

    logits rows per seq: [len(prompt) + new_tokens - 1, V] (every position that was computed).
    Block tables interleave sequences' blocks so a wrong slot would read a neighbour's KV.
    """
    n = len(prompts)
    max_len = max(len(p) for p in prompts) + new_tokens
    blocks_per_seq = -(-max_len // block)
    tables = [[b * n + s for b in range(blocks_per_seq)][::-1] for s in range(n)]
    kvs = [st.make_kv_cache(blocks_per_seq * n, block) for st in stages]
    seqs = [list(p) for p in prompts]
    done = [0] * n  # tokens whose KV is cached
    rows = [[] for _ in range(n)]
    while any(len(s) - len(p) < new_tokens for s, p in zip(seqs, prompts)):
        active = [i for i in range(n) if len(seqs[i]) - len(prompts[i]) < new_tokens]
        chunks = [(done[i], min(chunk, len(seqs[i]) - done[i]), tables[i]) for i in active]
        ids = torch.tensor([t for i, (s, k, _) in zip(active, chunks) for t in seqs[i][s:s + k]])
        meta = AttnMetadata.build(chunks, block, "cpu")
        hidden = None
        for st, kv in zip(stages, kvs):
            hidden = st(ids if st.is_first else None, hidden, meta, kv)
        logits = stages[-1].compute_logits(hidden)  # [T, V]
        for i, (a, b) in zip(active, zip(meta.query_start_loc, meta.query_start_loc[1:])):
            rows[i].append(logits[a:b])
        last = logits[meta.last_rows]
        picks = sample(last, [SamplingSpec()] * len(active), [0] * len(active))
        for i, (s, k, _), tok in zip(active, chunks, picks):
            done[i] = s + k
            if done[i] == len(seqs[i]):  # chunk reached the end: its last row predicts a token
                seqs[i].append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)], [torch.cat(r) for r in rows]


# qwen3: per-head q/k norms; gemma2: sandwich norms, 1 + w norms, scaled embeddings, tanh GELU,
# attention and final soft caps, a 6-key window on even layers (the prompts are longer, chunks of 5
# cross it); phi3: fused qkv / gate_up checkpoint tensors, LongRoPE short factors and scaling, a
# 10-key window on every layer; phi4: Phi-4-mini's partial rotary (half of each head), LongRoPE, tied
# head; mixtral: 4 experts, top-2 renormalised; qwen3moe: q/k norms, MoE layers around a dense one
# (tests/checkpoints.py). The families also go through the mesh (tests/test_families.py), as do the
# stage counts of the older kinds (test_e2e.py).
@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "llama3", "sharded", "qwen3", "gemma2", "phi3",
                                  "phi4", "mixtral", "qwen3moe"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stages_match_transformers(ckpt_root, kind, num_stages):
    path = make_hf_checkpoint(ckpt_root, kind)
    stages = [load_stage(path, a, b)[0] for a, b in SPLITS[num_stages]]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (13, 3, 22, 1)]
    check_against_hf(path, stages, prompts)


def test_loader_reads_only_its_range(ckpt_root, monkeypatch):
    path = make_hf_checkpoint(ckpt_root, "sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    import stage_worker.loader as loader

    opened = []
    real = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda p, **kw: opened.append(str(p)) or real(p, **kw))
    stage, cfg = load_stage(path, 1, 3)
    names = set(stage.state_dict())
    assert names and all(n.startswith(("layers.1.", "layers.2.")) for n in names)
    assert stage.embed_tokens is None and stage.norm is None and stage.lm_head is None
    needed = {str(path / f) for n, f in index.items() if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert set(opened) == needed and len(needed) < len(set(index.values()))


def test_tied_last_stage_uses_embedding(ckpt_root):
    path = make_hf_checkpoint(ckpt_root, "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    last, _ = load_stage(path, 2, 4)
    emb = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(last.lm_head.weight, emb) and last.embed_tokens is None
    single, _ = load_stage(path, 0, 4)
    assert single.lm_head.weight is single.embed_tokens.weight


def test_checkpoint_errors(ckpt_root, tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_stage(tmp_path, 0, 1)
    src = make_hf_checkpoint(ckpt_root, "llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    load_stage(bad, 0, 2)  # the missing tensor is outside this range
    with pytest.raises(CheckpointError,
                       match=r"bad/model.safetensors: missing tensor model.layers.3.mlp.up_proj.weight"):
        load_stage(bad, 2, 4)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: not a readable"):
        load_stage(bad, 0, 1)
    raw = json.loads((src / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        load_stage(bad, 0, 1)


def test_missing_shard_names_file(ckpt_root, tmp_path):
    src = make_hf_checkpoint(ckpt_root, "sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    gone = index["model.layers.2.mlp.up_proj.weight"]
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError, match=f"{gone}: shard file is missing"):
        load_stage(tmp_path, 2, 3)


def test_bf16_stage_dtypes(ckpt_root):
    path = make_hf_checkpoint(ckpt_root, "llama")
    first, _ = load_stage(path, 0, 2, dtype=torch.bfloat16)
    last, _ = load_stage(path, 2, 4, dtype=torch.bfloat16)
    meta = AttnMetadata.build([(0, 6, [0, 1])], BLOCK, "cpu")
    h = first(torch.arange(3, 9), None, meta, first.make_kv_cache(2, BLOCK))
    assert h.dtype == torch.bfloat16 and h.shape == (6, 64)
    out = last(None, h, meta, last.make_kv_cache(2, BLOCK))
    assert last.compute_logits(out[-1:]).dtype == torch.float32


def test_kv_cache_budget_and_metadata():
    per_block = PagedKVCache.block_bytes(3, 16, 2, 8, torch.float16)
    assert per_block == 2 * 3 * 16 * 2 * 8 * 2
    assert PagedKVCache.blocks_for_budget(10 * per_block + 1, 3, 16, 2, 8, torch.float16) == 10
    kv = PagedKVCache(3, 10, 16, 2, 8, torch.float16, "cpu")
    assert kv.bytes_per_block == per_block and kv.layer(2)[0].shape == (160, 2, 8)
    meta = AttnMetadata.build([(3, 2, [5, 1]), (0, 1, [2])], 4, "cpu")
    assert meta.positions.tolist() == [3, 4, 0]
    assert meta.slot_mapping.tolist() == [23, 4, 8]
    assert meta.context_lens == [5, 1] and meta.decode_ids == [1] and meta.last_rows == [1, 2]
    with pytest.raises(InvalidArgument, match="cannot hold"):
        AttnMetadata.build([(3, 2, [5])], 4, "cpu")


def test_sampler():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    greedy = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingSpec()] * 4, [0] * 4) == greedy
    topk1 = [SamplingSpec(temperature=1.3, top_k=1, seed=None)] * 4
    assert sample(logits, topk1, [0] * 4) == greedy
    tiny_p = [SamplingSpec(temperature=1.0, top_p=1e-6)] * 4
    assert sample(logits, tiny_p, [0] * 4) == greedy
    row = logits[2]
    spec = SamplingSpec(temperature=0.9, top_p=0.8, top_k=20, seed=1234)
    alone = [sample(row[None], [spec], [k])[0] for k in range(20)]
    mixed = [sample(torch.stack([logits[0], logits[1], row]),
                    [SamplingSpec(temperature=1.0), SamplingSpec(), spec], [5, 0, k])[2]
             for k in range(20)]
    assert alone == mixed and len(set(alone)) > 1
    other = [sample(row[None], [SamplingSpec(temperature=0.9, top_p=0.8, top_k=20, seed=99)],
                    [k])[0] for k in range(20)]
    assert other != alone
    probs = row.softmax(-1)
    nucleus = set(probs.argsort(descending=True)[:(probs.sort(descending=True).values.cumsum(0)
                                                     < 0.5).sum() + 1].tolist())
    draws = {sample(row[None], [SamplingSpec(temperature=1.0, top_p=0.5, seed=s)], [0])[0]
             for s in range(200)}
    assert draws <= nucleus


def test_demo_model_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_demo_model(tmp_path / "demo", seed=3)
    again = write_demo_model(tmp_path / "again", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (path / name).read_bytes() == (again / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tok("The gateway sends each micro-batch to the first stage.").input_ids
    assert prompt[0] == tok.bos_token_id == 0 and 500 <= len(tok) <= 1024
    stages = [load_stage(path, a, b)[0] for a, b in SPLITS[2]]
    tokens, rows = run_pipeline(stages, [prompt], 24)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens[0]])).logits[0, :-1]
    torch.testing.assert_close(rows[0], ref, atol=1e-4, rtol=1e-4)
    assert len(set(tokens[0])) >= 8  # random weights, yet not one token repeated
