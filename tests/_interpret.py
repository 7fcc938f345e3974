"""Shared harness of the Triton-interpreter checks (tests/_*_interpret_check.py) and of the tests that
launch them.

A check script runs as its own process with TRITON_INTERPRET=1, which must be set before triton is
first imported and would slow every other triton user of a shared process. This module imports
neither triton nor pytest at the top, so the scripts can use it as well as the test files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Elementwise (atol, rtol) against the torch reference in the same dtype: a few ulps (the interpreter
# truncates float32 -> bfloat16 casts instead of rounding to nearest). atol is scaled by the largest
# |reference| value: RoPE rounds its inputs (as decoder.py does) and a small output of a*cos - b*sin
# keeps the rounding error of the larger a and b.
CLOSE = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)}
# Relative error ||out - ref|| / ||ref|| against float64 from the same (rounded) inputs. bfloat16: over 300 random
# draws of the decode GEMV's smallest case (5 outputs, K=33, residual add + RMSNorm) in the interpreter, the kernel
# was up to 1.18% off (0.7% of the draws above 1%: a few ulps on a 5-element vector) and the torch reference alone
# up to 0.52%; a wrong kernel is ~100% off.
REL_FP64 = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}


# ---------------------------------------------------------------------------------------------------
# In the check scripts


class Report:
    """Prints one `ok  ` / `FAIL` line a case and counts the failures."""

    def __init__(self):
        self.failures = 0

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"{'ok  ' if ok else 'FAIL'} {name}" + (": " + detail if detail else ""))
        self.failures += not ok
        return ok

    def check(self, name: str, problems: list[str]) -> None:
        self.record(name, not problems, "; ".join(problems))

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def finish(self) -> int:
        """Prints the failure count; returns the exit status."""
        print(f"{self.failures} failure(s)")
        return self.exit_code


def start(description: str | None = None,
          add_arguments: Callable[[argparse.ArgumentParser], object] | None = None,
          ) -> tuple[Report, argparse.Namespace]:
    """The prologue of a check script's main(): refuses to run without TRITON_INTERPRET=1, parses the
    arguments (`--seed`, default fresh random data each run, after any that `add_arguments` adds),
    seeds torch and prints the seed. Returns a fresh Report and the parsed arguments."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 in the environment (it must be set before triton is imported)")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="default: fresh random data each run")
    opts = parser.parse_args()
    seed = torch.seed() if opts.seed is None else opts.seed
    torch.manual_seed(seed)
    print(f"seed {seed}")
    return Report(), opts


def nonzero_randn(*shape, scale=1.0):
    """Gaussian values pushed away from zero: a zero would hide a missed scale or an unwritten output."""
    x = torch.randn(*shape)
    return (x + 0.1 * torch.sign(x)) * scale


def rel_err(out, ref):
    """||out - ref|| / ||ref||, in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def compare(what, out, ref, ref64, dtype, problems):
    """Appends to `problems` what is off in `out`: a non-finite element, a difference from the torch
    reference `ref` beyond CLOSE, or (when `ref64` is given) a relative error beyond REL_FP64."""
    if not torch.isfinite(out).all():
        problems.append(f"{what}: non-finite (an element left unwritten?)")
        return
    atol, rtol = CLOSE[dtype]
    atol *= max(1.0, ref.abs().max().item())
    if not torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol):
        problems.append(f"{what}: max |diff| vs reference {(out.float() - ref.float()).abs().max().item():.2e}")
    if ref64 is not None and rel_err(out, ref64) > REL_FP64[dtype]:
        problems.append(f"{what}: rel err vs float64 {rel_err(out, ref64):.2e} > {REL_FP64[dtype]:.0e}")


# ---------------------------------------------------------------------------------------------------
# In the test files


def run_interpret_check(script_name: str, *args: str, timeout: float = 300) -> None:
    """Runs tests/`script_name` with TRITON_INTERPRET=1 and the repo root on PYTHONPATH; fails the
    calling test, showing the script's output, unless it exits 0. Skips when triton is missing.

    The data are seeded (`--seed`, from FLEXVLM_INTERPRET_SEED, default 0), so the suite gives the same
    answer on every run; FLEXVLM_INTERPRET_SEED=random draws fresh data, as running a script by hand does."""
    import pytest

    pytest.importorskip("triton")
    seed = os.environ.get("FLEXVLM_INTERPRET_SEED", "0")
    if seed != "random" and "--seed" not in args:
        args = (*args, "--seed", seed)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(TESTS_DIR / script_name), *args],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
