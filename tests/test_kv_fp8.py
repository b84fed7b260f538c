"""`--kv-cache-dtype fp8`: K and V kept as e4m3 (scale 1.0, saturated at +-448), half a bf16
pool's bytes.

The reference is transformers with an attention function that rounds keys and values to e4m3
before SDPA: rounding is idempotent, so that is exactly attention over an FP8 pool. On the CPU the
mesh computes in fp32 around the rounded K/V, so greedy tokens must be equal, through
`stagemesh up` at two stages with chunked prefill and two requests at once. The Triton kernels'
FP8 loads and stores are tested in tests/test_kernels.py (interpreter).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from stage_worker.kv_cache import FP8_KV, FP8_KV_MAX, PagedKVCache, read_slots, write_slots
from stage_worker.loader import load_stage
from tests.checkpoints import make_deepseek_checkpoint, make_hf_checkpoint
from tests.reference import hf_greedy, random_prompts


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV).to(x.dtype)


def _hf_greedy_fp8_kv(model_dir, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, query, _fp8_round(key), _fp8_round(value), *args, **kwargs)

    AttentionInterface.register("fp8_kv_reference", fp8_kv_attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="fp8_kv_reference").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_write_and_read_slots_round_and_saturate():
    pool = torch.full((6, 2, 4), float("nan")).to(FP8_KV)
    values = torch.tensor([[1000.0, -1000.0, 0.3, -17.0]]).expand(2, 2, 4)
    write_slots(pool, torch.tensor([4, 1]), values)
    got = read_slots(pool, torch.tensor([[1, 4]]), torch.float32)  # any index shape
    assert got.shape == (1, 2, 2, 4)
    assert torch.equal(got[0, 0, 0], torch.tensor([448.0, -448.0, 0.3, -17.0]).to(FP8_KV).float())
    assert read_slots(pool, torch.tensor([0, 2, 3, 5]), torch.float32).isnan().all()  # untouched
    pool.view(torch.uint8)  # a byte view serves copy_blocks too
    cache = PagedKVCache(1, 3, 2, 2, 4, FP8_KV)
    write_slots(cache.k_caches[0], torch.tensor([0, 1]), values)
    cache.copy_blocks([(0, 2)])
    assert torch.equal(read_slots(cache.k_caches[0], torch.tensor([4, 5]), torch.float32),
                       read_slots(cache.k_caches[0], torch.tensor([0, 1]), torch.float32))


def test_pool_dtype_and_bytes(tmp_path):
    """FP8 pools cost a byte per value (a quarter of fp32's): four times the blocks in one budget.
    The MLA latent pool (DeepSeek) refuses it by name."""
    llama = make_hf_checkpoint(tmp_path / "l", "llama", num_layers=2)
    stage, _ = load_stage(llama, 0, 2)
    assert stage.kv_cache_dtype("auto") == torch.float32 and stage.kv_cache_dtype("fp8") == FP8_KV
    assert stage.kv_block_bytes(16) == 4 * stage.kv_block_bytes(16, FP8_KV)
    pool = stage.make_kv_cache(3, 16, dtype=FP8_KV)
    assert pool.k_caches[0].dtype == FP8_KV and pool.bytes_per_block == stage.kv_block_bytes(16, FP8_KV)
    ds = make_deepseek_checkpoint(tmp_path / "d", "v3", num_layers=1)
    ds_stage, _ = load_stage(ds, 0, 1)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 is for K/V pools"):
        ds_stage.kv_cache_dtype("fp8")
    with pytest.raises(ValueError, match="unknown kv cache dtype"):
        stage.kv_cache_dtype("int8")


def test_fp8_kv_mesh_equals_transformers_on_fp8_rounded_kv(tmp_path):
    """Two stages, prefill chunks of 8 tokens, two requests in flight: greedy tokens equal
    transformers' with K/V rounded to e4m3; the unrounded reference differs (so the FP8 pool is
    what the mesh attended over)."""
    from stagemesh.cli.harness import mesh
    from stagemesh.client import AsyncClient

    src = make_hf_checkpoint(tmp_path, "llama", num_layers=2)
    prompts = random_prompts(seed=7, lengths=[19, 6], vocab=320)
    new = 12
    expected = [_hf_greedy_fp8_kv(src, p, new) for p in prompts]
    assert expected != [hf_greedy(src, p, new, ignore_eos=True) for p in prompts]  # the rounding shows

    async def generate(address):
        async with AsyncClient(address) as client:
            return await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=new, ignore_eos=True, timeout=120)
                                          for p in prompts])

    with mesh(src, stages=2, extra=["--kv-cache-dtype", "fp8", "--max-batched-tokens", "8"]) as m:
        outs = asyncio.run(generate(m.address))
    assert [o.token_ids for o in outs] == expected


def test_fp8_kv_on_a_latent_pool_is_refused_before_anything_loads(tmp_path):
    """`up` says so in one line before starting a child; a worker started by hand exits before
    its ready line (so `up` would count a failed start, not restart a loaded worker forever)."""
    import subprocess
    import sys

    from stagemesh.cli.harness import stagemesh_cmd

    ds = make_deepseek_checkpoint(tmp_path, "v3", num_layers=1)
    res = subprocess.run([*stagemesh_cmd(), "up", "--model", str(ds), "--kv-cache-dtype", "fp8"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--kv-cache-dtype fp8 is for K/V pools" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([sys.executable, "-m", "stage_worker", "--model", str(ds), "--coordinator", "127.0.0.1:1",
                          "--kv-cache-dtype", "fp8"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "--kv-cache-dtype fp8 is for K/V pools" in res.stderr
    assert "listening" not in res.stdout + res.stderr
