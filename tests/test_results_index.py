"""`results/INDEX.md` accounts for every committed result file: what it is, what makes it, where it was measured."""
from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
HEADER = "| path | what it holds | made by | measured on | status |"
STATUSES = ("current", "archive", "test fixture")


def committed_results() -> list[str]:
    """Paths under results/ relative to it, outside results/device/ (each session's INDEX.md covers that): the
    tracked files where git can say, otherwise every file there."""
    try:
        out = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [line[len("results/"):] for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        paths = [str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file()]
    return sorted(p for p in paths if not p.startswith("device/") and p != "INDEX.md")


def index_rows() -> list[list[str]]:
    text = (RESULTS / "INDEX.md").read_text()
    assert HEADER in text
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            assert len(cells) == 5, line
            rows.append(cells)
    return rows


def test_every_result_file_is_indexed_and_every_row_names_files():
    files = committed_results()
    rows = index_rows()
    globs = [re.fullmatch(r"`([^`]+)`", path).group(1) for path, *_ in rows]
    unindexed = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not unindexed, f"files under results/ missing from results/INDEX.md: {unindexed}"
    stale = [g for g in globs if not any(fnmatch.fnmatch(f, g) for f in files)]
    assert not stale, f"results/INDEX.md rows that match no file: {stale}"


def test_every_row_says_how_it_was_made_and_its_status():
    for path, what, made_by, measured_on, status in index_rows():
        assert what and made_by and measured_on, path
        assert status.startswith(STATUSES), (path, status)
        for script in re.findall(r"scripts/[\w./-]+\.(?:py|sh)", made_by):
            assert (ROOT / script).exists(), (path, script)
