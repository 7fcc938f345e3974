"""E3: stage-aware latency estimator, same-device accuracy and cross-device recalibration.

Same device (held-out configs): the (crops, top_k, active_blocks) grid is split at random into
train / held-out configs (`--train-fraction`, repeated over `--split-seeds`); the stage estimator,
a log-linear total-only regression and a tiny MLP are fitted on the training table's rows at the
training configs, and scored on rows at held-out configs of
- the end-to-end test set (primary; what `same_device` reports): the held-out validation requests
  (molmoe-1b, random configs and output lengths), the measured requests table (micro on H100 and
  on the CPU), and
- the stage table itself (32 forced output tokens).
Fitted on a requests table, the stage estimator weights rows by 1/total (`weighting="total"`:
picked over 1/stage by 5-fold cross-validation over the training configs of the micro CPU
requests table); on a stage table by 1/stage.

Recalibration: an estimator fitted on the whole source stage table is moved to the target device
from N target end-to-end measurements (N random requests of the target's validation set; the rest
is the test set; `--recal-seeds` draws): source only, global affine, per-stage affine, fine-tune
(ridge prior towards the source coefficients). Reference: an estimator fitted on the full target
stage table.

micro here is the retired 112-px micro (weights b47291b9, the shipped default until 2026-11-28):
its H100 and H200 stage tables, validation runs and CPU tables are archived under
`results/device_tables/` and `results/replay_latency_validation_micro112_*`. Its 352,800-row H100
requests table was too large to keep beside the shipped one; `--micro112-requests` reads it from a
checkout of it (`git show b3fa873:flexvlm_env/assets/profiles/micro_h100_requests.parquet > FILE`).
The estimator of the shipped micro is also fitted on its own H200 stage table
(`results/e3_estimators/micro_h200.json`, what M3 loads).

`--quick`: stage tables only as training data for micro on the H100 (no 352,800-row requests
table), one split, 3 recalibration draws, a short MLP; runs in well under a minute on a CPU and
writes under the git-ignored `results/quick/` unless `--out`, `--figures` or `--estimators` say where. Writes `<out>` (JSON), `e3_scatter.parquet` beside
it (the stage estimator's held-out predictions that the second figure draws, at most 2,000 seeded rows per
same-device set), figures under `--figures`, and the fitted estimators (JSON) under `--estimators`. The fitting and
scoring are `flexvlm_env.experiments.latency_estimator`'s; `python scripts/make_figures.py --only e3` redraws the
figures from the summary and the scatter table.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import tyro

from flexvlm_env.experiments import latency_estimator as e3
from flexvlm_env.experiments.common import QUICK_SUBDIR, run_header, versions
from flexvlm_env.latency import StageLatencyEstimator
from flexvlm_env.profiles.tables import read_parquet, write_parquet

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "flexvlm_env" / "assets" / "profiles"
RESULTS = ROOT / "results"
DEVICE_TABLES = RESULTS / "device_tables"
# Stage tables of the H100 -> H200 recalibration pairs: molmoe-1b's shipped one, the retired micro's archive.
H100_STAGES = {"molmoe-1b": ASSETS / "molmoe-1b_h100_stages.parquet", "micro": DEVICE_TABLES / "micro112_h100_stages.parquet"}
H200_NAMES = {"molmoe-1b": "molmoe-1b_h200", "micro": "micro112_h200"}


@dataclass
class Args:
    quick: bool = False
    """small, fast run (stage tables only, one split, short MLP)"""
    out: Path = RESULTS / "e3_summary.json"
    """the summary JSON (--quick: results/quick/e3_summary.json unless given)"""
    figures: Path = RESULTS / "figures"
    """where the figures go"""
    estimators: Path = RESULTS / "e3_estimators"
    """where the estimators fitted on whole source tables are saved (JSON)"""
    train_fraction: float = 0.7
    """share of each table's configurations the estimators train on (the rest are held out)"""
    split_seeds: int = 5
    """random train/held-out splits per table"""
    recal_seeds: int = 20
    """random draws of the N target measurements per recalibration point"""
    ridge: float = 1.0
    """fine-tune: weight of the prior towards the source coefficients"""
    mlp_steps: int = 1500
    """training steps of the MLP baseline"""
    max_train_rows: int = 40000
    """rows of a requests table used for training (random subset)"""
    cpu_stages: Path = DEVICE_TABLES / "micro112_cpu_stages.parquet"
    """the micro@CPU stage table (the retired 112-px micro, measured on this project's CPU)"""
    cpu_requests: Path = DEVICE_TABLES / "micro112_cpu_requests.parquet"
    """the micro@CPU requests table"""
    micro112_requests: Path = DEVICE_TABLES / "micro112_h100_requests.parquet"
    """the retired micro's H100 requests table (not in the tree; see the module docstring); without
    it the micro@H100 set trains and tests on its stage table alone, as --quick does"""

    def __post_init__(self) -> None:  # a bad value is a usage error (tyro: exit status 2)
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"--train-fraction={self.train_fraction!r} must be in (0, 1)")
        for name in ("split_seeds", "recal_seeds", "mlp_steps", "max_train_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        # A table given on the command line must exist; only the defaults may be absent (the H100 one is not shipped).
        for name in ("cpu_stages", "cpu_requests", "micro112_requests"):
            value = getattr(self, name)
            if value != getattr(Args, name) and not Path(value).is_file():
                raise ValueError(f"--{name.replace('_', '-')}={value} is not a file")


# ---------------------------------------------------------------------------- data

def _validation(path: Path) -> tuple[pd.DataFrame, str]:
    """An end-to-end validation table (columns measured_<stage>_ms) and its device name (the
    JSON report beside it; the Parquet carries no metadata)."""
    frame, meta = read_parquet(path)
    device = meta.get("device_name")
    report = path.with_suffix(".json")
    if device is None and report.exists():
        device = json.loads(report.read_text()).get("device")
    if device is None:
        raise ValueError(f"{path}: no device name in its metadata or in {report}")
    return frame, device


def _bucket(meta: dict) -> int:
    """Prefill padding of the runtime that measured a table: 64-token CUDA-graph buckets, none
    (eager) on a CPU."""
    return 1 if meta.get("device", {}).get("device_type") == "cpu" else 64


def _rel(path: Path | str) -> str:
    """`path` relative to the repository when inside it (summaries are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def same_device_sets(args: Args) -> dict[str, dict]:
    """name -> {train: table, tests: {name: table with measured_* columns}, primary: test name}."""
    sets = {}
    st, meta = read_parquet(ASSETS / "molmoe-1b_h100_stages.parquet")
    val, _ = _validation(RESULTS / "replay_latency_validation.parquet")
    sets[f"molmoe-1b@{meta['device_name']}"] = {
        "train": st, "bucket": _bucket(meta), "noise": e3.noise_floor(st, ["crops", "input_tokens", "top_k", "active_blocks"]), "train_source": "molmoe-1b_h100_stages.parquet",
        "tests": {"validation_requests": val, "stage_table": e3.with_measured_prefix(st)}, "primary": "validation_requests"}
    st, meta = read_parquet(H100_STAGES["micro"])
    val, _ = _validation(RESULTS / "replay_latency_validation_micro112_h100.parquet")
    entry = {"train": st, "train_source": H100_STAGES["micro"].name, "bucket": _bucket(meta),
             "noise": e3.noise_floor(st, ["crops", "input_tokens", "top_k", "active_blocks"]),
             "tests": {"validation_requests": val, "stage_table": e3.with_measured_prefix(st)}, "primary": "validation_requests"}
    if not args.quick and args.micro112_requests.exists():
        req, _ = read_parquet(args.micro112_requests)
        req = req.drop(columns=["answer"])
        entry.update(train=req, train_source=f"{args.micro112_requests.name} (random subset of the training configs' rows)", weighting="total",
                     primary="requests_table", noise=e3.noise_floor(req, ["request_id", "crops", "top_k", "active_blocks"]))
        entry["tests"]["requests_table"] = e3.with_measured_prefix(req)
    elif not args.quick:
        print(f"{args.micro112_requests} is missing: micro@{meta['device_name']} uses its stage table alone, unlike the "
              "committed results/e3_summary.json (see the module docstring for the file)")
    sets[f"micro@{meta['device_name']}"] = entry
    if args.cpu_stages.exists():
        st, meta = read_parquet(args.cpu_stages)
        entry = {"train": st, "train_source": args.cpu_stages.name, "tests": {"stage_table": e3.with_measured_prefix(st)},
                 "primary": "stage_table", "bucket": _bucket(meta), "noise": e3.noise_floor(st, ["crops", "input_tokens", "top_k", "active_blocks"])}
        if args.cpu_requests.exists():
            req, _ = read_parquet(args.cpu_requests)
            req = req.drop(columns=["answer"], errors="ignore")
            entry["tests"]["requests_table"] = e3.with_measured_prefix(req)
            # the requests table covers every config (one measurement each): train on its training
            # configs' rows, as for micro on the H100; the stage table (other session) is a test set
            entry.update(train=req, train_source=args.cpu_requests.name, primary="requests_table", weighting="total")
        sets[f"micro@{meta['device_name']}"] = entry
    return sets


def recal_pairs(args: Args) -> list[dict]:
    pairs = []
    for preset in ("molmoe-1b", "micro"):
        src, src_meta = read_parquet(H100_STAGES[preset])
        name = H200_NAMES[preset]
        target, target_device = _validation(RESULTS / f"replay_latency_validation_{name}.parquet")
        tgt_table, _ = read_parquet(DEVICE_TABLES / f"{name}_stages.parquet")
        pairs.append({"key": f"{preset}@{src_meta['device_name']}->{preset}@{target_device}", "source": src, "target_bucket": 64,
                      "target": target, "target_table": tgt_table, "target_set": f"replay_latency_validation_{name}.parquet"})
    if args.cpu_requests.exists() and args.cpu_stages.exists():
        src, src_meta = read_parquet(H100_STAGES["micro"])
        req, req_meta = read_parquet(args.cpu_requests)
        tgt_table, _ = read_parquet(args.cpu_stages)
        pairs.append({"key": f"micro@{src_meta['device_name']}->micro@{req_meta['device_name']}", "source": src,
                      "target_bucket": _bucket(req_meta),
                      "target": e3.with_measured_prefix(req.drop(columns=["answer"], errors="ignore")),
                      "target_table": tgt_table, "target_set": args.cpu_requests.name})
    return pairs


def quick_paths(args: Args) -> None:
    """A quick run never overwrites the full run's results: its default outputs go under the git-ignored
    results/quick/ (a path given explicitly stays as given)."""
    for name in ("out", "figures", "estimators"):
        if getattr(args, name) == getattr(Args, name):
            setattr(args, name, RESULTS / QUICK_SUBDIR / getattr(Args, name).name)


def main(args: Args) -> dict:
    import torch

    torch.set_num_threads(1)
    start = time.time()
    if not 0 < args.train_fraction < 1:
        raise ValueError(f"train_fraction={args.train_fraction} must be in (0, 1)")
    splits = 1 if args.quick else args.split_seeds
    seeds = 3 if args.quick else args.recal_seeds
    if args.quick:
        args.mlp_steps = min(args.mlp_steps, 150)
        quick_paths(args)
    summary: dict = {**run_header("E3", args), "quick": args.quick, "same_device": {}, "recalibration": {},
                     "recalibration_detail": {}, "notes": []}
    scatters = []
    for name, spec in same_device_sets(args).items():
        entry, sc = e3.same_device(name, spec, splits, args.train_fraction, args.max_train_rows, args.mlp_steps)
        summary["same_device"][name] = entry
        scatters.append(sc)
    args.estimators.mkdir(parents=True, exist_ok=True)
    for pair in recal_pairs(args):
        curves, detail = e3.recalibration(pair, seeds, args.ridge)
        summary["recalibration"][pair["key"]] = curves
        summary["recalibration_detail"][pair["key"]] = detail
    # Estimators fitted on whole source tables (what a guardrail would load).
    saved = {}
    for preset, path in (("molmoe-1b", H100_STAGES["molmoe-1b"]), ("micro", H100_STAGES["micro"]),
                         ("molmoe-1b", DEVICE_TABLES / "molmoe-1b_h200_stages.parquet"),
                         ("micro", DEVICE_TABLES / "micro112_h200_stages.parquet"), ("micro", args.cpu_stages),
                         ("micro", ASSETS / "micro_h200_stages.parquet")):
        if not path.exists():
            continue
        table, meta = read_parquet(path)
        est = StageLatencyEstimator.fit(table, prefill_bucket=_bucket(meta), metadata={"preset": preset, "device_name": meta.get("device_name"),
                                                         "fitted_on": path.name, "rows": len(table)})
        out = args.estimators / f"{path.stem.replace('_stages', '')}.json"
        # keyed by the file's stem: the retired and the shipped micro share a device name
        saved[f"{out.stem} ({preset}@{meta.get('device_name')})"] = _rel(est.save(out))
    summary["estimators"] = saved
    scatter = e3.scatter_table(scatters)
    scatter_path = args.out.with_name("e3_scatter.parquet")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(scatter, scatter_path, {"experiment": "E3", "what": "stage estimator on held-out configurations, split 0 "
                                          f"(at most {e3.SCATTER_POINTS} seeded rows per same-device set)", **versions()},
                  compression_level=19)
    summary["scatter"] = _rel(scatter_path)
    summary["figures"] = [_rel(p) for p in e3.plot(summary["recalibration_detail"], scatter, args.figures)]
    summary["notes"].append(
        "molmoe-1b on the H200: the stage table's host preprocessing medians (3.4-6.6 ms) are far above those of its "
        "own validation runs (~2.2 ms); recalibration uses the validation runs, so per-stage errors are reported in "
        "recalibration_detail.")
    summary["notes"].append("stage estimator: prefill has a per-expert-hit term B*H(N, k), decode a warm-up term for the first "
                            "steps after prefill (fitted only where answers have several lengths: the requests tables); "
                            "detail.fit_weighting says how stage rows were weighted.")
    summary["notes"].append("same_device[*].mape_total is on the primary end-to-end test set at held-out configs (test_set); "
                            "detail.models has every model x test set x stage.")
    summary["elapsed_s"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({"same_device": {k: {kk: v[kk] for kk in ("mape_total", "p95_ape_total", "per_stage_mape", "total_only_mape")}
                                      for k, v in summary["same_device"].items()},
                      "recalibration": summary["recalibration"], "elapsed_s": summary["elapsed_s"]}, indent=1))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
