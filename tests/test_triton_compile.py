"""Every Triton kernel of stage_worker/kernels compiled ahead of time for NVIDIA GPUs, on the CPU.

The interpreter (TRITON_INTERPRET=1, tests/interpreted.py) runs a kernel's Python body and never
type-checks it as the compiler does: mla_rope's kernel passed its interpreter tests and then failed
to compile on an H200 (a name set in both branches of an `if` with two shapes). So the launches
those tests make are recorded (kernel, argument dtypes and values, constexprs, launch options) in
interpreter children, and replayed here through Triton's own launch path (its binder specialises
ints and alignment as a real launch does) into `triton.compile` for sm_90, down to a cubin;
for sm_80 (A100), launches that together cover every argument type, constexpr value and option,
FP8 ones excepted (sm_89+).
"""

from __future__ import annotations

import importlib
import multiprocessing
import pkgutil
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tests.interpreted import INTERPRETED, SHARDS, completed_run

FP8 = ("float8_e4m3fn", "float8_e5m2")


def _kernels() -> set[str]:
    """'module.name' of each JIT function the package launches (`name[grid](...)`); the others are
    helpers that compile inside them."""
    import stage_worker.kernels as pkg
    from triton.runtime.jit import JITFunction

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        source = Path(module.__file__).read_text()
        found |= {f"{module.__name__}.{name}" for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and re.search(rf"\b{name}\[", source)}
    return found


def _specialise(launch: dict, arch: int):
    """A recorded launch through JITFunction.run's binder -> (ASTSource, options, target)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    class Pointer:  # what the binder reads of a tensor
        def __init__(self, dtype, align):
            self.dtype, self.align = getattr(torch, dtype), align

        def data_ptr(self):
            return self.align

    def decode(v):
        return Pointer(**v) if isinstance(v, dict) else v

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {k: decode(v) for k, v in launch["kwargs"].items()}
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *map(decode, launch["args"]), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, target


def _features(launch: dict) -> frozenset:
    """What makes two launches compile differently: argument types, constexprs, launch options."""
    src, options, _ = _specialise(launch, 90)
    return frozenset([("type", k, v) for k, v in src.signature.items()]
                     + [("constexpr", k, repr(v)) for k, v in src.constants.items()]
                     + [("option", k, repr(v)) for k, v in options.__dict__.items()])


def _compile(launch: dict, arch: int) -> str | None:
    """None when the launch compiles to a cubin for sm_<arch>, else the error."""
    import triton

    src, options, target = _specialise(launch, arch)
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # every compile error is a finding
        return f"{type(e).__name__}: {e}"[-4000:]
    return None if compiled.asm.get("cubin") else "no cubin"


def _plan(launches: list[dict]) -> list[tuple[dict, int]]:
    """(launch, arch) to compile: each distinct launch for sm_90; for sm_80, launches chosen
    greedily until every argument type, constexpr value and option seen is compiled once."""
    by_kernel: dict[str, dict[frozenset, dict]] = {}
    for launch in launches:
        by_kernel.setdefault((launch["module"], launch["name"]), {}).setdefault(_features(launch), launch)
    plan = [(launch, 90) for distinct in by_kernel.values() for launch in distinct.values()]
    for distinct in by_kernel.values():
        ampere = {f: l for f, l in distinct.items()
                  if not any(isinstance(a, dict) and a["dtype"] in FP8 for a in [*l["args"], *l["kwargs"].values()])}
        need = set().union(*ampere)
        while need:
            features = max(ampere, key=lambda f: len(f & need))
            need -= features
            plan.append((ampere[features], 80))
    return plan


@pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU: runs outside the interpreter")
def test_every_kernel_compiles_for_hopper_and_ampere():
    pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("Triton has no NVIDIA backend")

    run = completed_run()  # the kernel tests' launches (tests/interpreted.py)
    launches = [launch for launch in run["launches"] if launch["module"].startswith("stage_worker.kernels.")]

    kernels = _kernels()
    missing = kernels - {f"{launch['module']}.{launch['name']}" for launch in launches}
    assert kernels and not missing, (f"no interpreter test in {sorted(run['files'])} launches {sorted(missing)}: "
                                     "add one\n" + "\n".join(log[-3000:] for log in run["logs"]))

    plan = _plan(launches)
    with ProcessPoolExecutor(SHARDS, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = list(pool.map(_compile, *zip(*plan)))
    failed = [f"{launch['module']}.{launch['name']} sm_{arch} {launch['kwargs']}:\n{error}"
              for (launch, arch), error in zip(plan, errors) if error]
    assert not failed, "\n\n".join(failed)

