"""The `stagemesh` command as users and outside checks call it (DESIGN.md "Contracts")."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest
import requests

from stagemesh.cli.harness import mesh, new_port, stagemesh_cmd


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*stagemesh_cmd(), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-model"
    res = run_cli("demo-model", str(out))
    assert res.returncode == 0, res.stderr
    return out


def test_demo_model_serves_text_prompts_and_generate_json(demo_dir):
    with mesh(demo_dir, stages=2) as m:
        assert "ready" in m.ready_line
        res = run_cli("generate", "--target", m.address, "--prompt", "The gateway sends", "--max-tokens", "8",
                      "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert len(out["token_ids"]) == out["usage"]["completion_tokens"] <= 8
        assert isinstance(out["text"], str)
        assert out["finish_reason"] in ("length", "stop")
        assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["cached_tokens"] >= 0
        ids = run_cli("generate", "--target", m.address, "--prompt-ids", "5,6,7", "--max-tokens", "4", "--json")
        assert len(json.loads(ids.stdout)["token_ids"]) == 4
        # Same greedy request twice: same tokens.
        again = run_cli("generate", "--target", m.address, "--prompt", "The gateway sends", "--max-tokens", "8",
                        "--json")
        assert json.loads(again.stdout)["token_ids"] == out["token_ids"]


def test_generate_reports_a_bad_request_as_json(demo_dir):
    """Also: up's --served-model-name and --max-model-len reach the HTTP API."""
    http = new_port()
    with mesh(demo_dir, stages=1, extra=["--http-port", str(http), "--served-model-name", "house-model",
                                         "--max-model-len", "40"]) as m:
        res = run_cli("generate", "--target", m.address, "--prompt-ids", "1,2", "--max-tokens", "0", "--json")
        assert res.returncode == 1
        assert json.loads(res.stdout)["error"]["code"] == "INVALID_ARGUMENT"
        base = f"http://127.0.0.1:{http}/v1"
        card = requests.get(f"{base}/models", timeout=10).json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("house-model", 40)
        ok = requests.post(f"{base}/completions", json={"model": "house-model", "prompt": [5, 6, 7], "max_tokens": 37},
                           timeout=60)
        assert ok.status_code == 200, ok.text
        long = requests.post(f"{base}/completions", json={"model": "house-model", "prompt": [5, 6, 7],
                                                          "max_tokens": 38}, timeout=60)
        assert long.status_code == 400, long.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_every_child_on_signal(demo_dir, sig, tmp_path):
    state = tmp_path / "plan.json"
    flags = {"--max-waiting": "7", "--dead-after-s": "2.5", "--lease-ttl-s": "30", "--state-file": str(state)}
    with mesh(demo_dir, stages=2, extra=[a for kv in flags.items() for a in kv]) as m:
        children = psutil.Process(m.proc.pid).children(recursive=True)
        assert len(children) == 4  # coordinator, 2 workers, gateway
        # up's flags reach the service that takes each one
        takers = {"--max-waiting": "gateway", "--dead-after-s": "coordinator", "--lease-ttl-s": "stage_worker",
                  "--state-file": "coordinator"}
        for flag, module in takers.items():
            for child in m.children(module):
                cmd = child.cmdline()
                given, passed = flags[flag], cmd[cmd.index(flag) + 1]
                assert passed == given or float(passed) == float(given), (flag, cmd)
        assert json.loads(state.read_text())["replicas"], "the coordinator keeps its plan in --state-file"
        m.proc.send_signal(sig)
        assert m.proc.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


def test_children_die_with_a_killed_launcher(demo_dir):
    """...those restarted by up included (they are forked by its main thread, which PR_SET_PDEATHSIG follows)."""
    with mesh(demo_dir, stages=1) as m:
        old = m.children("stage_worker")[0].pid
        os.kill(old, signal.SIGKILL)
        m.wait_child("stage_worker", not_pid=old)
        m.wait_stderr("restarted worker0")
        children = psutil.Process(m.proc.pid).children(recursive=True)
        m.proc.kill()
        m.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not [p for p in alive if _still_running(p)]


def _still_running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an exited child that its new parent, maybe a container's PID 1
    that does not reap, has not collected)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_missing_or_malformed_checkpoint_is_one_line_naming_the_file(tmp_path, demo_dir):
    res = run_cli("up", "--model", str(tmp_path / "nope"))
    assert res.returncode != 0 and "nope" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((demo_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage")
    res = run_cli("up", "--model", str(broken))
    assert res.returncode != 0
    assert "model.safetensors" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (broken / "config.json").write_text("{not json")
    res = run_cli("up", "--model", str(broken))
    assert "config.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_too_many_stages_is_refused(demo_dir):
    res = run_cli("up", "--model", str(demo_dir), "--stages", "9")
    assert res.returncode == 2 and "layers" in res.stderr


def test_bad_kernel_tuning_file_is_refused_before_any_child_starts(demo_dir, tmp_path):
    bad = tmp_path / "tuning.json"
    bad.write_text('{"decode": {"bfloat16": [96, 4, 2]}}')
    for path, said in ((bad, "decode tile for bfloat16"), (tmp_path / "absent.json", "absent.json")):
        res = run_cli("up", "--model", str(demo_dir), "--kernel-tuning", str(path))
        assert res.returncode == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1
