"""The README's runnable examples run as written (they are what a new user copies first)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_writing_your_own_controller_runs_and_prints_it_against_the_baselines(tmp_path):
    code = readme_block("### Writing your own controller")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[3:]}
    assert set(rows) == {"crops_by_budget", "full", "tokens_only", "depth_only", "width_only", "greedy"}
    # the mean retention and violation rate the README quotes after the example (replay is seeded: exact)
    retention, violations = (float(x) for x in rows["crops_by_budget"].split("|")[-1].split()[:2])
    assert (retention, violations) == (0.815, 0.263)


@pytest.mark.parametrize("heading", ["## Using it", "## The environments"])
def test_first_steps_run_as_written(heading, tmp_path):
    """The model (answer, latency record, score) and the env (reset, step, info) examples."""
    out = subprocess.run([sys.executable, "-c", readme_block(heading)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
