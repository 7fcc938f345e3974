"""The README's headline tables say what the result files they cite hold.

Two tables once kept an earlier run's numbers after their files were re-run (M4's guardrail table, M3's CPU times):
these tests read the README's model card, E5 and M4 tables and compare every cell with its file, at the precision
the README prints."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def table_after(header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first markdown table whose header row starts with `header_start`."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def close_to(printed: str, value: float) -> bool:
    """Whether `printed` (e.g. "0.84") is `value` rounded to the decimals printed."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_model_card_quality_table_is_micro_quality_json():
    quality = json.loads((ROOT / "results" / "micro_quality.json").read_text())
    by_config = {(c["crops"], c["top_k"], c["active_blocks"]): c for c in quality["configs"]}
    rows = table_after("| config | coco_2014_vqa")
    names = [c.strip() for c in next(line for line in README.splitlines()
                                     if line.startswith("| config | coco_2014_vqa")).strip("|").split("|")][1:]
    assert rows, "no model card table"
    for row in rows:
        knobs = tuple(int(v) for v in re.match(r"\((\d+), (\d+), (\d+)\)", row[0]).groups())
        config = by_config[knobs]
        for name, printed in zip(names, row[1:]):
            value = config["mean"] if name == "mean" else config["per_family"][name]
            assert close_to(printed, value), (row[0], name, printed, value)


def test_e5_table_is_e5_summary_json():
    entries = {e["method"]: e for e in json.loads((ROOT / "results" / "e5_summary.json").read_text())["entries"]}
    rows = table_after("| method | reward | quality retention |")
    assert len(rows) == len(entries), (len(rows), sorted(entries))
    for row in rows:
        method = re.match(r"`(\w+)`", row[0]).group(1)
        mean = entries[method]["final_mean"]
        for printed, key in zip(row[1:5], ("reward", "quality_retention", "violation_rate", "latency_p95_ms")):
            assert close_to(printed, mean[key]), (method, key, printed, mean[key])


@pytest.mark.parametrize("label, key", [("none", "none"), ("oracle (recorded median latency)", "oracle"),
                                        ("trained estimator", "estimator"),
                                        ("estimator x lognormal noise (sigma 0.2)", "noisy")])
def test_m4_table_is_m4_summary_json(label, key):
    mean = json.loads((ROOT / "results" / "m4_summary.json").read_text())["mean_over_fractions"][key]
    row = next(r for r in table_after("| guardrail | violation rate | quality retention |") if r[0] == label)
    assert close_to(row[1], mean["violation_rate"]) and close_to(row[2], mean["quality_retention"]), (row, mean)
