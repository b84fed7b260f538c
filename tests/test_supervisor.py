"""stagemesh.cli.supervisor with real child processes (tiny Python commands), and `up` giving up."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading

import psutil
import pytest

from stagemesh.cli.supervisor import GaveUp, RestartPolicy, Supervisor
from tests.test_cli import run_cli

FAST = RestartPolicy(start_timeout_s=30, initial_backoff_s=0.05, max_backoff_s=0.2, stable_after_s=0.5,
                     max_start_failures=3)
SERVE = "import time; print('x ready', flush=True); time.sleep(600)"


def test_a_child_that_exits_is_restarted_with_the_same_command():
    out = io.StringIO()
    sup = Supervisor(FAST, out=out)
    stop = threading.Event()
    try:
        child = sup.spawn("svc", [sys.executable, "-c", SERVE], env={"SUPERVISED_MARK": "1"})
        assert sup.wait_ready(child, stop)
        first = child.pid
        assert psutil.Process(first).environ().get("SUPERVISED_MARK") == "1"
        os.kill(first, signal.SIGKILL)
        while child.pid == first or not child.ready_at:
            sup.poll()
            stop.wait(0.02)
        assert child.running() and child.restarts == 1
        assert psutil.Process(child.pid).environ().get("SUPERVISED_MARK") == "1"
    finally:
        sup.stop()
    assert not child.running()
    log = out.getvalue()
    assert f"svc pid {first} was killed by SIGKILL" in log and f"restarted svc pid {child.pid}" in log
    assert f"svc pid {child.pid} ready again" in log


def test_a_child_that_keeps_failing_at_start_makes_it_give_up_with_its_output():
    sup = Supervisor(FAST, out=io.StringIO())
    code = "import sys; print('cannot bind 127.0.0.1:1', file=sys.stderr); sys.exit(3)"
    try:
        child = sup.spawn("svc", [sys.executable, "-c", code])
        with pytest.raises(GaveUp) as err:
            sup.wait_ready(child, threading.Event())
    finally:
        sup.stop()
    message = str(err.value)
    assert "svc failed at start 3 times in a row" in message and "exited with code 3" in message
    assert "cannot bind 127.0.0.1:1" in message
    assert child.restarts == 2


def test_a_child_not_ready_in_time_is_killed_and_counted_as_a_failed_start():
    policy = RestartPolicy(start_timeout_s=0.3, initial_backoff_s=0.05, max_backoff_s=0.1, max_start_failures=2)
    sup = Supervisor(policy, out=io.StringIO())
    try:
        child = sup.spawn("slow", [sys.executable, "-c", "import time; time.sleep(600)"])
        with pytest.raises(GaveUp, match="not ready within --start-timeout-s 0.3"):
            sup.wait_ready(child, threading.Event())
    finally:
        sup.stop()


def test_up_gives_up_on_a_coordinator_that_cannot_start(tmp_path, ckpt_dir):
    """A state file that cannot be read (here a directory): up says which child, why, and stops."""
    bad = tmp_path / "state"
    bad.mkdir()
    res = run_cli("up", "--model", str(ckpt_dir("llama", num_layers=4)), "--state-file", str(bad), "--port", "0",
                  "--max-start-failures", "2", timeout=180)
    assert res.returncode == 1
    assert "coordinator failed at start 2 times in a row" in res.stderr
    assert str(bad) in res.stderr.split("giving up")[-1]  # its own error, among its last lines

