"""Triton kernels tested on the CPU: a test file's kernel tests run in a child pytest with
TRITON_INTERPRET=1 (the variable must be set before Triton is imported), collected only there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # this process is such a child
ROOT = Path(__file__).resolve().parents[1]
CHILD_PYTEST_ARGS = ["-o", "addopts=", "-q", "-p", "no:cacheprovider"]  # a child's pytest: quiet, no cache


def interpreter_env() -> dict[str, str]:
    """This process's environment with Triton's interpreter on, for a child process."""
    return {**os.environ, "TRITON_INTERPRET": "1"}


def run_in_interpreter(test_file: str, keyword: str | None = None) -> None:
    """Run test_file's tests (those matching -k keyword) in an interpreter child: all must pass,
    none skipped."""
    select = ["-k", keyword] if keyword else []
    run = subprocess.run([sys.executable, "-m", "pytest", *CHILD_PYTEST_ARGS, *select, test_file], cwd=ROOT,
                         env=interpreter_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]  # e.g. "5 passed, 6 deselected in 9.1s"
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]
