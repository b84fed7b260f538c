"""Kernel tuning files (stage_worker/kernels/tuning.py): parsed strictly, merged by the sweeps,
found per GPU name, and read by the kernels and dispatchers when they launch; the worker refuses
a bad file at start with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from stage_worker.kernels import paged_decode as pd
from stage_worker.kernels import tuning
from stage_worker.models import quant


def test_round_trip_keeps_only_what_differs(tmp_path):
    t = tuning.KernelTuning(device="NVIDIA H100 80GB HBM3", decode={"float8_e4m3fn": (128, 4, 3)},
                            gemv=(4, 2048, 4, 2), gemv_scales="shared", gemv_split_k=2, gemv_max_m=2,
                            fuse_act_quant=False)
    text = t.to_json()
    assert json.loads(text) == {"device": "NVIDIA H100 80GB HBM3", "decode": {"float8_e4m3fn": [128, 4, 3]},
                                "gemv": [4, 2048, 4, 2], "gemv_split_k": 2, "gemv_scales": "shared", "gemv_max_m": 2,
                                "fuse_act_quant": False}
    assert tuning.KernelTuning.from_json(text) == t
    assert json.loads(tuning.KernelTuning().to_json()) == {"device": ""}


@pytest.mark.parametrize("raw,match", [
    ([], "holds one JSON object, got list"),
    ({"gemv_tile": [8, 1024, 4, 2]}, "unknown keys in a kernel tuning file: \\['gemv_tile'\\]"),
    ({"device": 5}, "device: a string"),
    ({"decode": None}, "decode: an object"),
    ({"decode": [[64, 4, 2]]}, "decode: an object"),
    ({"decode": {"bf16": [64, 4, 2]}}, "unknown pool dtype 'bf16'"),
    ({"decode": {"bfloat16": [64, 4]}}, "decode tile for bfloat16"),
    ({"decode": {"bfloat16": [96, 4, 2]}}, "decode tile for bfloat16"),  # not a power of two
    ({"decode": {"bfloat16": [64.0, 4, 2]}}, "decode tile for bfloat16"),
    ({"decode": {"bfloat16": [True, 4, 2]}}, "decode tile for bfloat16"),
    ({"decode": {"bfloat16": "64,4,2"}}, "decode tile for bfloat16"),
    ({"gemv": 5}, "gemv tile"),
    ({"gemv": [8, 1024, 0, 2]}, "gemv tile"),
    ({"gemv": [6, 1024, 4, 2]}, "gemv tile"),
    ({"gemv": [8, 64, 4, 2]}, "gemv tile"),
    ({"gemv": [8, 1000, 4, 2]}, "gemv tile"),
    ({"gemv_scales": "row"}, "gemv_scales 'row'"),
    ({"gemv_max_m": -1}, "gemv_max_m: an int >= 0"),
    ({"gemv_max_m": True}, "gemv_max_m: an int >= 0"),
    ({"gemv_max_m": 1.0}, "gemv_max_m: an int >= 0"),
    ({"fuse_act_quant": 1}, "fuse_act_quant: true or false"),
    ({"act_quant_groups": 0}, "act_quant_groups must be >= 1"),
    ({"mla_split_r": 3}, "mla_split_r: 1, 2, 4 or 8"),
    ({"gemv_split_k": 0}, "gemv_split_k: 1 to 16"),
    ({"gemv_split_k": 17}, "gemv_split_k: 1 to 16"),
    ({"moe": []}, "moe: an object"),
    ({"moe": {"bf16": {"0": [16, 64, 64, 1, 4, 4]}}}, "unknown weight type 'bf16'"),
    ({"moe": {"fp8": {"8": [64, 64, 128, 8, 4, 4]}}}, "moe fp8: an object of rows-per-expert buckets"),  # no 0
    ({"moe": {"16bit": {"x": [16, 64, 64, 1, 4, 4], "0": [16, 64, 64, 1, 4, 4]}}}, "rows-per-expert buckets"),
    ({"moe": {"fp8": {"0": [16, 64, 64, 1, 4, 5]}}}, "moe fp8 bucket 0"),  # FP8 steps whole quant groups
    ({"moe": {"16bit": {"0": [16, 48, 64, 1, 4, 4]}}}, "moe 16bit bucket 0"),
])
def test_bad_files_are_named(raw, match):
    with pytest.raises(ValueError, match=match):
        tuning.KernelTuning.from_json(json.dumps(raw))


def test_sweeps_merge_into_one_file(tmp_path):
    """bench_decode_attention.py, bench_gemv.py --layers and bench_moe.py --sweep each write their
    winners; decode tiles merge per pool dtype, MoE tables per weight type, the rest stays."""
    path = tmp_path / "t.json"
    fp8_table, table16 = {0: (16, 64, 256, 1, 4, 4)}, {0: (16, 64, 64, 1, 4, 4), 32: (64, 128, 64, 8, 4, 4)}
    tuning.merge(path, device="GPU", decode={"bfloat16": (64, 4, 3)})
    tuning.merge(path, device="GPU", gemv=(2, 1024, 4, 2), gemv_scales="grid", moe={"fp8": fp8_table})
    tuning.merge(path, device="GPU", moe={"16bit": table16})
    merged = tuning.merge(path, device="GPU", decode={"float8_e4m3fn": (128, 8, 3)})
    assert tuning.load(str(path)) == merged == tuning.KernelTuning(
        device="GPU", decode={"bfloat16": (64, 4, 3), "float8_e4m3fn": (128, 8, 3)}, gemv=(2, 1024, 4, 2),
        moe={"fp8": fp8_table, "16bit": table16})


def test_shipped_file_is_found_by_device_name(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "SHIPPED", tmp_path)
    tuning.shipped_path("Some GPU 80GB").write_text('{"device": "Some GPU 80GB", "gemv_max_m": 2}')
    assert tuning.load("", "Some GPU 80GB").gemv_max_m == 2
    assert tuning.load("", "Other GPU") == tuning.load("", "") == tuning.KernelTuning()
    explicit = tmp_path / "mine.json"
    explicit.write_text('{"gemv_max_m": 0}')
    assert tuning.load(str(explicit), "Some GPU 80GB").gemv_max_m == 0  # a given file wins


def test_paged_decode_launches_with_the_tuned_tile(tune, monkeypatch):
    """The tile per pool dtype (the default for the others), and the eager path's splits sized by it."""
    launched = []
    monkeypatch.setattr(pd, "_paged_decode_triton", lambda *a: launched.append(a[-1]) or a[0])
    q, kc = torch.zeros(2, 4, 16), torch.zeros(64, 2, 16)
    tables, ctx = torch.zeros(2, 4, dtype=torch.long), torch.tensor([3, 5])
    tune(decode={"float32": (128, 8, 3)})
    for pool in (kc, kc.to(torch.bfloat16)):
        pd.paged_decode(q, pool, pool, tables, ctx, 0.25, 16, use_triton=True)
    pd.paged_decode(q, kc, kc, tables, ctx, 0.25, 16, use_triton=True, config=(32, 4, 2))  # explicit wins
    assert launched == [(128, 8, 3), pd.DECODE_CONFIG, (32, 4, 2)]
    assert pd.decode_config(torch.float32) == (128, 8, 3)
    assert pd.choose_splits(1, 8, 1000, block_n=pd.decode_config(torch.float32)[0]) == 8  # 1000 keys / 128


def test_gemv_launches_with_the_tuned_tile_form_and_split(tune, monkeypatch):
    pytest.importorskip("triton")
    from stage_worker.kernels import fp8 as k

    launches = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw["BLOCK_N"], kw["GROUPS"] * k.GROUP_K,
                                                        kw["num_warps"], kw["SCALE_MODE"], kw["LATE_SUM"], kw["SPLIT_K"]))

    monkeypatch.setattr(k, "_gemv_kernel", Spy())
    x, w = torch.zeros(1, 2048), torch.zeros(64, 2048, dtype=torch.float8_e4m3fn)
    k.w8a16_gemv(x, w, torch.ones(1, 16))
    tune(gemv=(4, 512, 2, 3), gemv_scales="shared", gemv_late_sum=True, gemv_split_k=2)
    k.w8a16_gemv(x, w, torch.ones(1, 16))
    k.w8a16_gemv(x, w, torch.ones(64, 16), group_n=1)  # shared does not fit one-row scale groups: grid
    tune(gemv=(4, 512, 2, 3), gemv_split_k=16)
    k.w8a16_gemv(x, w, torch.ones(1, 16))  # 16 splits of 4 K steps: one program per step
    grid, shared = k.GEMV_SCALE_MODES.index("grid"), k.GEMV_SCALE_MODES.index("shared")
    bn, bk, warps, _ = k.GEMV_CONFIG
    assert launches == [((64 // bn, 1), bn, bk, warps, grid, False, 1), ((16, 2), 4, 512, 2, shared, True, 2),
                        ((16, 2), 4, 512, 2, grid, True, 2), ((16, 4), 4, 512, 2, grid, False, 4)]
    with pytest.raises(ValueError, match="does not fit"):  # asked for explicitly, it is refused
        k.w8a16_gemv(x, w, torch.ones(64, 16), group_n=1, scale_mode="shared")


def test_dispatch_thresholds_come_from_the_tuning(tune):
    assert quant.gemm_backend(1, 4096, 4096, True) == "gemv"
    tune(gemv_max_m=0)
    assert quant.gemm_backend(1, 4096, 4096, True) == "triton"
    tune(channel_gemv_max_m=0)
    assert quant.channel_gemm_backend(1, True) == "rowwise"


def test_worker_refuses_a_bad_tuning_file_in_one_line(tmp_path, ckpt_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('{"gemv_tile": [8, 1024, 4, 2]}')
    p = subprocess.run([sys.executable, "-m", "stage_worker", "--model", str(ckpt_dir("llama", 1)), "--device",
                        "cpu", "--coordinator", "127.0.0.1:1", "--kernel-tuning", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("stage_worker: unknown keys in a kernel tuning file")


def test_eager_decode_sizes_its_splits_by_the_tuned_tile(tune, monkeypatch, ckpt_dir):
    """attention.attend's paged decode rows (the eager route): splits capped by the context in the
    tuned tile's keys per iteration."""
    from stage_worker import attention
    from stage_worker.attention import AttnMetadata
    from stage_worker.loader import load_stage

    model, _ = load_stage(ckpt_dir("llama", 1), 0, 1)
    seen = []
    real = attention.paged_decode
    monkeypatch.setattr(attention, "paged_decode", lambda *a, **kw: seen.append(a[7]) or real(*a, **kw))
    monkeypatch.setattr(attention, "num_sms", lambda device: 132)
    kv = model.make_kv_cache(64, 4)
    prompt = list(range(3, 90))  # 87 tokens, then one decode row with 88 keys
    tables = list(range(23))
    model(torch.tensor(prompt), None, AttnMetadata.build([(0, len(prompt), tables)], 4, "cpu", paged=True), kv)
    step = AttnMetadata.build([(len(prompt), 1, tables)], 4, "cpu", paged=True)
    for tile, splits in (((64, 4, 2), 2), ((32, 4, 2), 3), ((128, 4, 2), 1)):  # ceil(88 / keys per iteration)
        tune(decode={"float32": tile})
        step.num_splits = 0
        model(torch.tensor([5]), None, step, kv)
        assert seen[-1] == splits, tile


def test_worker_runs_with_a_good_tuning_file_and_says_so(tmp_path, ckpt_dir):
    """The worker's main sets the file for its process and logs what differs from the defaults
    (read back from the active tuning, before it serves)."""
    good = tmp_path / "good.json"
    good.write_text('{"device": "test", "decode": {"float32": [32, 4, 3]}, "gemv_max_m": 0}')
    p = subprocess.Popen([sys.executable, "-m", "stage_worker", "--model", str(ckpt_dir("llama", 1)), "--device",
                          "cpu", "--coordinator", "127.0.0.1:1", "--kernel-tuning", str(good)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = threading.Timer(60, p.kill)  # no such line within a minute: the loop ends at EOF
    deadline.start()
    try:
        for line in p.stdout:  # JSON log lines; the worker then keeps trying the absent coordinator
            if '"kernel_tuning"' in line:
                break
        event = json.loads(line)
    finally:
        deadline.cancel()
        p.kill()
        p.wait(30)
    assert event["event"] == "kernel_tuning" and event["device"] == "test" and event["gemv_max_m"] == 0
    assert event["decode"] == {"float32": [32, 4, 3]}


def test_fused_moe_takes_the_tuned_tables(tune):
    """A weight type's table replaces the shipped one whole (largest bucket <= rows per expert);
    the other type keeps its own."""
    from stage_worker.kernels import fused_moe

    tune(moe={"fp8": {0: (16, 64, 256, 1, 4, 4), 64: (128, 128, 128, 8, 8, 3)}})
    assert fused_moe.moe_config(8 * 63, 8, True) == (16, 64, 256, 1, 4, 4)  # 63 rows per expert
    assert fused_moe.moe_config(8 * 64, 8, True) == (128, 128, 128, 8, 8, 3)
    assert fused_moe.moe_config(8 * 64, 8, False) == fused_moe.CONFIGS_16BIT[32]


def test_mla_decode_takes_the_tuned_split(tune):
    from stage_worker.kernels import mla_decode as md

    assert md.decode_config(128)["SPLIT_R"] == 1 and "SPLIT_R" not in md.decode_config(16)
    tune(mla_split_r=2)
    assert md.decode_config(128)["SPLIT_R"] == 2
