"""The layer contracts of pyproject.toml's [tool.importlinter] hold (import-linter, indirect imports
included): the pure core imports neither torch nor grpc, the four services import each other only
through `stagemesh` and the wire, the ground floor (`stagemesh` minus `stagemesh.cli`) imports no
service and not the CLI, and no service imports the CLI. A broken contract fails here with
import-linter's chain of imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUND_FLOOR = "the ground floor imports neither a service nor the CLI"


def _contracts() -> list[dict]:
    """Each [[tool.importlinter.contracts]] table as {key: value} (3.10 has no tomllib)."""
    config = (ROOT / "pyproject.toml").read_text().split("[tool.importlinter]", 1)[1]
    tables = config.split("[[tool.importlinter.contracts]]")[1:]
    pairs = [re.findall(r'^(\w+) = (".*?"|\[.*?\])$', table, re.M | re.S) for table in tables]
    return [{key: ast.literal_eval(value) for key, value in table} for table in pairs]


def test_import_contracts_kept():
    names = [contract["name"] for contract in _contracts()]
    assert len(names) >= 4, names
    # `lint-imports`, run by this interpreter (its script may not sit beside it outside a venv)
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    run = subprocess.run([sys.executable, "-c", lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    for name in names:
        assert f"{name} KEPT" in report, report
    assert f"Contracts: {len(names)} kept, 0 broken." in report, report


def test_ground_floor_contract_lists_every_module():
    """A new `stagemesh/x.py` must join the ground-floor contract, else it would go unguarded."""
    (contract,) = [c for c in _contracts() if c["name"] == GROUND_FLOOR]
    present = {f"stagemesh.{p.stem}" for p in (ROOT / "stagemesh").glob("*.py") if p.stem != "__init__"}
    present |= {f"stagemesh.{p.parent.name}" for p in (ROOT / "stagemesh").glob("*/__init__.py")}
    assert present - {"stagemesh.cli"} == set(contract["source_modules"])
    init = ast.parse((ROOT / "stagemesh" / "__init__.py").read_text())
    assert not [n for n in ast.walk(init) if isinstance(n, (ast.Import, ast.ImportFrom))], "stagemesh/__init__.py imports"
