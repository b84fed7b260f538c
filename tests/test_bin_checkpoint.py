"""PyTorch pickle checkpoints (`pytorch_model.bin`, sharded with `pytorch_model.bin.index.json`)
load exactly as the same weights in safetensors, through `torch.load(weights_only=True, mmap=True)`;
up's up-front check lists their tensor names without torch and without running the pickle; an
unsupported architecture is one clear line at `up` and at worker start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stage_worker.loader import load_stage
from stagemesh.checkpoint import validate_checkpoint
from stagemesh.errors import CheckpointError
from tests.checkpoints import make_hf_checkpoint


def to_bin(src, dst, shards: int = 1):
    """The safetensors checkpoint at src rewritten as .bin (as transformers 4.x saved them)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dst / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    out = {}
    for kind in ("llama", "tied"):
        src = make_hf_checkpoint(root, kind, num_layers=4)
        out[kind] = (src, to_bin(src, root / f"{kind}-bin"), to_bin(src, root / f"{kind}-bin3", shards=3))
    return out


@pytest.mark.parametrize("kind", ["llama", "tied"])
@pytest.mark.parametrize("layers", [(0, 2), (2, 4), (0, 4)])
def test_bin_stage_equals_safetensors_stage(ckpts, kind, layers):
    src, single, sharded = ckpts[kind]
    want = load_stage(src, *layers)[0].state_dict()
    for path in (single, sharded):
        got = load_stage(path, *layers)[0].state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (path.name, name)


def test_legacy_bin_format_loads(ckpts, tmp_path):
    """torch < 1.6's format (not a zip: cannot be memory-mapped) is read whole."""
    src = ckpts["llama"][0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(src / "config.json", legacy / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), legacy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    assert validate_checkpoint(legacy).num_hidden_layers == 4
    want, got = load_stage(src, 2, 4)[0].state_dict(), load_stage(legacy, 2, 4)[0].state_dict()
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


def test_up_check_reads_bin_names_without_running_the_pickle(ckpts, tmp_path):
    src, single, sharded = ckpts["llama"]
    assert validate_checkpoint(single).num_hidden_layers == 4
    assert validate_checkpoint(sharded).num_hidden_layers == 4
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.3.input_layernorm.weight"]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: missing tensor model.layers.3.input_layernorm"):
        validate_checkpoint(bad)
    # A pickle that would run a command: neither the check nor the loader runs it.
    marker = tmp_path / "ran"
    state["model.layers.3.input_layernorm.weight"] = _Payload(str(marker))
    torch.save(state, bad / "pytorch_model.bin")
    validate_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        load_stage(bad, 2, 4)
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_unsupported_architecture_is_one_line_at_up_and_worker(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64}))
    for cmd in (["-m", "stagemesh.cli", "up", "--model", str(tmp_path)],
                ["-m", "stage_worker", "--model", str(tmp_path), "--coordinator", "127.0.0.1:1"]):
        run = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "architecture 'GPTNeoXForCausalLM' is not supported (supported: " in run.stderr, run.stderr
        assert "LlamaForCausalLM" in run.stderr and "ready" not in run.stdout + run.stderr
