"""Careless input to the `stagemesh` command: one clear line and exit status 2, never a traceback.

Every case fails before anything is served or started, so none needs a mesh: `generate` is
pointed at a port nobody listens on (reaching it would be UNAVAILABLE, exit 1, not 2). generate
and demo-model run in this process (`main(argv)`: an escaping exception fails the test as a
traceback would); `up` runs as a subprocess, since getting past the check would start a mesh.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from stagemesh.cli import main
from stagemesh.cli.harness import stagemesh_cmd

NOBODY = "127.0.0.1:1"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*stagemesh_cmd(), *args], capture_output=True, text=True, timeout=timeout)


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, captured.out, captured.err)


def assert_one_clear_line(out: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("flags,words", [
    (["--prompt", "hi", "--max-tokens", "3000000000"], ["--max-tokens", "3000000000"]),
    (["--prompt", "hi", "--top-k", str(2**40)], ["--top-k"]),
    (["--prompt", "hi", "--seed", "-1"], ["--seed"]),
    (["--prompt", "hi", "--seed", str(2**64)], ["--seed"]),
    (["--prompt-ids", "1,2,3000000000"], ["--prompt-ids", "3000000000"]),
    (["--prompt", "hi", "--timeout", "inf"], ["--timeout"]),
    (["--prompt", "hi", "--timeout", "nan"], ["--timeout"]),
    (["--prompt", "hi", "--stop", "\udcff"], ["--stop", "UTF-8"]),
], ids=["max-tokens", "top-k", "seed-negative", "seed-2**64", "prompt-ids", "timeout-inf", "timeout-nan",
        "stop-not-utf8"])
def test_generate_flags_that_cannot_make_a_request(capsys, flags, words):
    assert_one_clear_line(run_here(capsys, "generate", "--target", NOBODY, *flags), *words)


def test_demo_model_to_a_bad_path(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert_one_clear_line(run_here(capsys, "demo-model", str(a_file)), str(a_file), "not a directory")
    assert_one_clear_line(run_here(capsys, "demo-model", str(a_file / "under")), "Not a directory")
    assert_one_clear_line(run_here(capsys, "demo-model", "/proc/stagemesh-demo"), "/proc/stagemesh-demo")
    assert_one_clear_line(run_here(capsys, "demo-model", str(tmp_path / "d"), "--layers", "0"), "--layers")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_up_on_a_busy_port_says_so_before_starting_anything(ckpt_dir, flag):
    model_dir = ckpt_dir("llama", num_layers=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--port": str(port), "--http-port": "0"}
        if flag == "--http-port":
            ports = {"--port": "0", "--http-port": str(port)}
        out = run("up", "--model", str(model_dir), *(a for kv in ports.items() for a in kv), timeout=60)
    assert_one_clear_line(out, flag, str(port), "not free")
    assert out.stdout == ""  # no ready line, nothing a child printed
