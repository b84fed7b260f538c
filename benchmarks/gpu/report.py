"""The table bench_gpu.py prints, and its files: the summary (OUT/bench_gpu.json, what results
files keep) and, only when asked, the raw data (per-request tokens and latencies, profiler
tables) in a folder outside the source tree."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Floors (output tok/s): mixed = the 256-request workload, b1 = batch-1 decode. H100: BENCHMARKS.md's.
# H200, recomputed as BENCHMARKS.md asks (4.8 TB/s, same compute): b1 = active weight bytes / 4.8 TB/s
# (V2-Lite 4.8 GB, Llama 16 GB); V3 stage = 1.4 s prefill + 34 x 57.5 GB expert re-reads (0.41 s) +
# 255 decode steps at 15 ms x 3.35 / 4.8 (2.67 s) = 4.5 s for 36.5k tokens.
FLOORS = {"H100": {"v2-lite": {"mixed_tok_s": 8000, "decode_b1_tok_s": 700}, "v3-stage": {"mixed_tok_s": 5900},
                   "llama8b": {"decode_b1_tok_s": 187}},
          "H200": {"v2-lite": {"decode_b1_tok_s": 1000}, "v3-stage": {"mixed_tok_s": 8100},
                   "llama8b": {"decode_b1_tok_s": 300}}}
IN_PROCESS_ROWS = ("prefill_512_ms", "prefill_2048_ms", "decode_step_b1_graph_ms", "decode_step_b1_ahead_ms",
                   "decode_step_b1_eager_ms", "decode_step_b64_graph_ms", "decode_step_b128_graph_ms")


def _fmt(v, fmt="{:.0f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def table(res: dict, device: str) -> str:
    rows = [("system", "mixed tok/s", "x gen_batch", "b1 decode tok/s", "TTFT 512 ms", "TTFT 2048 ms")]
    base = res.get("hf_generate_batch", {}).get("mixed_tok_s")
    meshes = [k for k, v in res.items() if k.startswith("stagemesh_") and isinstance(v, dict) and "error" not in v]
    for key in (*meshes, "hf_dynamic", "hf_static", "hf_generate_batch"):
        r = res.get(key)
        if not r:
            continue
        m = r.get("mixed_tok_s")
        rows.append((key, _fmt(m), _fmt(m / base, "{:.1f}x") if m and base else "-",
                     _fmt(r.get("decode_b1_tok_s"), "{:.1f}"), _fmt(r.get("ttft_512_ms"), "{:.1f}"),
                     _fmt(r.get("ttft_2048_ms"), "{:.1f}")))
    lines = [f"device: {device}"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    one = res.get("stagemesh_1", {})
    for key in meshes:
        m = res[key].get("mixed_tok_s")
        if m and one.get("mixed_tok_s") and key != "stagemesh_1":
            lines.append(f"{key} / stagemesh_1 (mixed): {m / one['mixed_tok_s']:.2f}")
    for key in meshes:
        other = res[key].get("decode_b1_tokens_sha") if key != "stagemesh_1" else None
        if one.get("decode_b1_tokens_sha") and other:
            lines.append(f"batch-1 greedy tokens of {key} equal stagemesh_1's: {other == one['decode_b1_tokens_sha']}")
    for key in meshes:
        for k, v in res[key].items():
            if k.startswith("decode_b1_equal_prefix_vs_"):
                lines.append(f"{key}: batch-1 greedy tokens equal to {k.rsplit('_vs_', 1)[1]}'s before the first "
                             f"difference: {v} of {res[key]['decode_b1_tokens_of']}")
    gpu = next((g for g in FLOORS if g in device), None)
    floors = FLOORS[gpu].get(res.get("config", {}).get("model", "llama8b"), {}) if gpu else {}
    for key in meshes:
        for k, floor in floors.items():
            if isinstance(res[key].get(k), (int, float)) and not (k == "mixed_tok_s" and res["config"].get("quick")):
                lines.append(f"{key}: {k} {res[key][k]:.1f} = {res[key][k] / floor:.0%} of the {gpu} floor ({floor})")
    inproc = res.get("inproc", {})
    lines += [f"in-process {k}: {inproc[k]:.2f}" for k in IN_PROCESS_ROWS if k in inproc]
    return "\n".join(lines)


def compare_tokens(res: dict, raw: dict) -> None:
    """Each run with a --suffix (e.g. _fp8) against the run of the same spec without it: how many of
    its batch-1 greedy tokens equal the other's before the first difference, per prompt."""
    for key, r in raw.items():
        base = next((b for b in raw if b != key and key.startswith(b + "_")), None)
        mine, theirs = r.get("decode_b1_tokens"), raw.get(base, {}).get("decode_b1_tokens") if base else None
        if mine and theirs and isinstance(res.get(key), dict):
            same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                    for x, y in zip(mine, theirs)]
            res[key]["decode_b1_equal_prefix_vs_" + base] = same
            res[key]["decode_b1_tokens_of"] = len(mine[0])


def raw_dir(path: str) -> Path | None:
    """--raw DIR, refused inside the source tree (results files there hold summaries only)."""
    if not path:
        return None
    out = Path(path).resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"--raw {path}: inside the source tree {ROOT}; give a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(out: Path, res: dict, raw: dict, raw_to: Path | None) -> None:
    (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
    if raw_to is not None:
        (raw_to / "bench_gpu_raw.json").write_text(json.dumps(raw, indent=1))
