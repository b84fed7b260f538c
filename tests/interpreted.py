"""Triton kernels tested on the CPU: a test file's kernel tests run with TRITON_INTERPRET=1 (the
variable must be set before Triton is imported), so in child processes, collected only there.

One interpreter run serves the whole session (`interpreter_run`): the kernel tests of every file
that calls `run_in_interpreter` run once, split over SHARDS children (the interpreter runs on one
core), each recording its tests' outcomes and every kernel launch they make. Each file's
`run_in_interpreter` then checks its own tests' outcomes, and tests/test_triton_compile.py compiles
the recorded launches for the GPU, without running the interpreter tests a second time.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # this process is such a child
ROOT = Path(__file__).resolve().parents[1]
CHILD_PYTEST_ARGS = ["-o", "addopts=", "-q", "-p", "no:cacheprovider"]  # a child's pytest: quiet, no cache
SHARDS = 2
CHILD_TIMEOUT_S = 300
_CALL = re.compile(r'run_in_interpreter\(__file__(?:,\s*"([^"]+)")?\)')

# Test files collected in this session (tests/conftest.py): the run covers only those, all of
# them when the compile test (which needs every kernel's launches) is among them.
collected_files: set[str] = set()


def interpreter_env() -> dict[str, str]:
    """This process's environment with Triton's interpreter on, for a child process."""
    return {**os.environ, "TRITON_INTERPRET": "1"}


def interpreter_files() -> dict[str, str | None]:
    """{test file relative to ROOT: keyword} of each file with kernel tests: those of its tests
    whose names contain the keyword (all of them when None) run in the interpreter."""
    files = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        found = _CALL.search(path.read_text())
        if found:
            files[str(path.relative_to(ROOT))] = found.group(1)
    return files


@functools.cache
def interpreter_run() -> dict:
    """The session's interpreter run: {"files": {file: keyword}, "outcomes": {nodeid: [outcome,
    text]}, "launches": [kernel launch, ...], "logs": [child output, ...]}."""
    files = interpreter_files()
    if collected_files and "tests/test_triton_compile.py" not in collected_files:
        files = {f: kw for f, kw in files.items() if f in collected_files}
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{shard}.json" for shard in range(SHARDS)]
        children = [subprocess.Popen([sys.executable, "-m", "tests.interpreted", str(out), str(shard),
                                      json.dumps(files)], cwd=ROOT, env=interpreter_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for shard, out in enumerate(outs)]
        try:
            logs = [child.communicate(timeout=CHILD_TIMEOUT_S)[0] for child in children]
        finally:
            for child in children:
                child.kill()
        run = {"files": files, "outcomes": {}, "launches": [], "logs": logs,
               "complete": all(out.exists() for out in outs)}  # a child that died wrote nothing
        for out in outs:
            if out.exists():
                shard = json.loads(out.read_text())
                run["outcomes"].update(shard["outcomes"])
                run["launches"] += shard["launches"]
    return run


def completed_run() -> dict:
    """interpreter_run, every child of which wrote its results (one that died wrote none)."""
    run = interpreter_run()
    assert run["complete"], "an interpreter child ended without its results:\n" + "\n".join(
        log[-3000:] for log in run["logs"])
    return run


def run_in_interpreter(test_file: str, keyword: str | None = None) -> None:
    """test_file's kernel tests (names containing keyword), run in the session's interpreter run:
    at least one ran, all passed, none skipped. `keyword` is read from the call's source text
    (interpreter_files), so pass it as a string literal."""
    rel = str(Path(test_file).resolve().relative_to(ROOT))
    run = completed_run()
    assert run["files"].get(rel, "missing") == keyword, f"{rel}: call run_in_interpreter(__file__, {keyword!r})"
    mine = {nodeid: o for nodeid, o in run["outcomes"].items() if nodeid.split("::")[0] == rel}
    bad = {nodeid: o for nodeid, o in mine.items() if o[0] != "passed"}
    assert mine and not bad, ("\n\n".join(f"{nodeid}: {outcome}\n{text[-3000:]}" for nodeid, (outcome, text)
                                          in bad.items()) or "no test ran") + "\n" + "\n".join(
        log[-2000:] for log in run["logs"])


def _child(out: str, shard: int, files: dict[str, str | None]) -> None:
    """Interpreter child: run this shard of the files' kernel tests, writing their outcomes and
    every kernel launch to out."""
    import pytest
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches, outcomes, run = [], {}, InterpretedFunction.run

    def encode(v):
        if isinstance(v, torch.Tensor):  # GPU pointers are 16-aligned: only a view's offset counts
            return {"dtype": str(v.dtype).removeprefix("torch."), "align": v.data_ptr() % 16}
        assert v is None or isinstance(v, (bool, int, float, str)), f"unrecorded kernel argument {type(v)}"
        return v

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__, "args": [encode(a) for a in args],
                         "kwargs": {k: encode(v) for k, v in kwargs.items()}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    class Shard:
        def pytest_collection_modifyitems(self, items):
            def selected(item):
                keyword = files[str(item.path.relative_to(ROOT))]
                return keyword is None or keyword in item.name
            items[:] = [item for item in items if selected(item)][shard::SHARDS]
            outcomes.update({item.nodeid: ["not run", ""] for item in items})  # until its reports come

        def pytest_collectreport(self, report):
            if report.failed:  # an import error: the file's check fails on it
                outcomes[report.nodeid] = ["failed", report.longreprtext]

        def pytest_runtest_logreport(self, report):
            if report.failed or report.skipped or report.when == "call":
                outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
                if outcomes.get(report.nodeid, ["passed"])[0] in ("passed", "not run"):
                    outcomes[report.nodeid] = [outcome, report.longreprtext]

    InterpretedFunction.run = recording_run
    pytest.main([*CHILD_PYTEST_ARGS, *files], plugins=[Shard()])
    Path(out).write_text(json.dumps({"outcomes": outcomes, "launches": launches}))


if __name__ == "__main__":  # a child of interpreter_run
    _child(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
