"""E3: the stage-aware latency estimator's accuracy on one device and its recalibration to another (../shared/EXPERIMENTS.md "E3").

Same device (`same_device`): the (crops, top_k, active_blocks) grid is split at random into training and held-out
configurations; the stage estimator (`flexvlm_env.latency.StageLatencyEstimator`, least squares and a Huber
variant), a log-linear total-only regression and a tiny MLP are fitted at the training configurations and scored
at the held-out ones on every test table (end-to-end requests, the stage table). Recalibration (`recalibration`):
an estimator fitted on a source device's stage table is moved to a target device from N of its end-to-end
measurements, by each method of `flexvlm_env.latency.METHODS`. `scripts/e3_latency_estimator.py` assembles the
tables (which files, which devices) and writes `e3_summary.json` and `e3_scatter.parquet` (a seeded subsample of
the stage estimator's held-out predictions, what the second figure draws); `plot_from_results(results_dir)`
rebuilds both figures from those two files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..latency import METHODS, STAGES, LogLinearTotal, MLPTotal, StageLatencyEstimator, recalibrate
from .common import figures_path, pyplot, save_figure

NS = (10, 25, 50, 100)  # target end-to-end requests a recalibration is given
SCATTER_POINTS = 2000  # per same-device set in e3_scatter.parquet (the figure needs the shape, not every row)


# ---------------------------------------------------------------------------- tables and metrics

def noise_floor(frame: pd.DataFrame, keys: list[str]) -> dict:
    """Repeat-to-repeat spread of the total: mean and P95 of |repeat - group mean| / group mean
    (%) over the groups of `keys` measured more than once; what no estimator can beat."""
    g = frame.groupby(keys)["total_ms"]
    size = g.transform("size")
    mean = g.transform("mean")
    ape = (np.abs(frame["total_ms"] - mean) / mean * 100)[size > 1]
    if ape.empty:
        return {"n": 0}
    return {"mape": float(ape.mean()), "p95_ape": float(np.percentile(ape, 95)), "n": len(ape), "keys": keys}


def with_measured_prefix(frame: pd.DataFrame) -> pd.DataFrame:
    """A requests / stage table with its stage columns also under measured_<stage>_ms."""
    cols = {f"measured_{s}_ms": frame[f"{s}_ms"] for s in STAGES}
    cols["measured_total_ms"] = frame["total_ms"]
    return frame.assign(**cols)


def config_key(frame: pd.DataFrame) -> pd.Series:
    """"crops/top_k/active_blocks" per row: the unit the same-device splits hold out."""
    return frame["crops"].astype(str) + "/" + frame["top_k"].astype(str) + "/" + frame["active_blocks"].astype(str)


def errors(pred, measured) -> np.ndarray:
    pred, measured = np.asarray(pred, float), np.asarray(measured, float)
    keep = measured > 0  # a one-token answer has no decode stage
    return np.abs(pred[keep] - measured[keep]) / measured[keep] * 100, np.abs(pred[keep] - measured[keep])


def summarize(ape: np.ndarray, ae: np.ndarray) -> dict:
    if len(ape) == 0:
        return {"n": 0}
    return {"mape": float(np.mean(ape)), "mdape": float(np.median(ape)), "p95_ape": float(np.percentile(ape, 95)), "mae_ms": float(np.mean(ae)),
            "p95_ae_ms": float(np.percentile(ae, 95)), "n": len(ape)}


# ---------------------------------------------------------------------------- same device

def same_device(name: str, spec: dict, splits: int, train_fraction: float, max_train_rows: int,
                mlp_steps: int) -> tuple[dict, dict]:
    """The stage estimator and the total-only baselines fitted on `spec["train"]` at a random `train_fraction` of
    its configurations and scored on every test table's rows at the others, over `splits` seeded splits; the
    headline (primary test set) with the detail, and split 0's held-out scatter of the stage estimator."""
    train_all = spec["train"]
    configs = np.array(sorted(config_key(train_all).unique()))
    # end-to-end requests (their own output lengths): weight stage rows by 1/total, the relative error
    # of what is predicted; a stage table's forced 32-token decode would distort those weights
    weighting = spec.get("weighting", "stage")
    pooled: dict = {}  # (model, test, column) -> [ape arrays], [ae arrays]
    scatter = None
    for seed in range(splits):
        rng = np.random.default_rng(seed)
        train_cfg = set(rng.choice(configs, size=round(train_fraction * len(configs)), replace=False))
        train = train_all[config_key(train_all).isin(train_cfg)]
        if len(train) > max_train_rows:
            train = train.sample(max_train_rows, random_state=seed)
        mlp_rows = train.sample(min(len(train), 10000), random_state=seed)
        models = {
            "stage_estimator": StageLatencyEstimator.fit(train, prefill_bucket=spec["bucket"], weighting=weighting),
            "stage_estimator_huber": StageLatencyEstimator.fit(train, prefill_bucket=spec["bucket"], robust=True, weighting=weighting),
            "loglinear_total": LogLinearTotal.fit(train),
            "mlp_total": MLPTotal(seed=seed).fit(mlp_rows, steps=mlp_steps),
        }
        for test_name, test in spec["tests"].items():
            held = test[~config_key(test).isin(train_cfg)]
            if held.empty:
                continue
            for model_name, model in models.items():
                if model_name.startswith("stage_estimator"):
                    pred = model.predict_frame(held)
                    cols = {c: pred[c].to_numpy() for c in pred}
                else:
                    cols = {"total_ms": model.predict_frame(held)}
                for col, p in cols.items():
                    ape, ae = errors(p, held[f"measured_{col}"])
                    slot = pooled.setdefault((model_name, test_name, col), ([], []))
                    slot[0].append(ape)
                    slot[1].append(ae)
                if model_name == "stage_estimator" and test_name == spec["primary"] and seed == 0:
                    scatter = (held["measured_total_ms"].to_numpy(), cols["total_ms"])
    out: dict = {"train_source": spec["train_source"], "primary_test": spec["primary"], "split_seeds": splits,
                 "prefill_bucket": spec["bucket"], "fit_weighting": weighting, "repeat_noise_floor_total": spec["noise"],
                 "train_fraction": train_fraction, "n_configs": len(configs), "models": {}}
    for (model_name, test_name, col), (apes, aes) in pooled.items():
        out["models"].setdefault(model_name, {}).setdefault(test_name, {})[col] = summarize(np.concatenate(apes), np.concatenate(aes))
    primary = out["models"]["stage_estimator"][spec["primary"]]
    headline = {
        "mape_total": primary["total_ms"]["mape"], "p95_ape_total": primary["total_ms"]["p95_ape"],
        "mdape_total": primary["total_ms"]["mdape"],
        "mae_total_ms": primary["total_ms"]["mae_ms"],
        "per_stage_mape": {s: primary[f"{s}_ms"]["mape"] for s in STAGES if primary.get(f"{s}_ms", {}).get("n")},
        "per_stage_p95_ape": {s: primary[f"{s}_ms"]["p95_ape"] for s in STAGES if primary.get(f"{s}_ms", {}).get("n")},
        "per_stage_mae_ms": {s: primary[f"{s}_ms"]["mae_ms"] for s in STAGES if primary.get(f"{s}_ms", {}).get("n")},
        "test_set": spec["primary"],
        "repeat_noise_floor_mape_total": spec["noise"].get("mape"),
        "total_only_mape": {m: out["models"][m][spec["primary"]]["total_ms"]["mape"] for m in ("loglinear_total", "mlp_total")},
        "huber_stage_estimator": {k: out["models"]["stage_estimator_huber"][spec["primary"]]["total_ms"][k] for k in ("mape", "mdape", "p95_ape")},
        "total_only_p95_ape": {m: out["models"][m][spec["primary"]]["total_ms"]["p95_ape"] for m in ("loglinear_total", "mlp_total")},
    }
    measured, predicted = scatter
    return {**headline, "detail": out}, {"name": name, "measured_total_ms": measured, "predicted_total_ms": predicted}


# ---------------------------------------------------------------------------- recalibration

def recalibration(pair: dict, seeds: int, ridge: float) -> tuple[dict, dict]:
    """An estimator fitted on the whole source stage table, moved to the target device from N target end-to-end
    measurements by each method of `flexvlm_env.latency.METHODS` (`seeds` draws of N; the rest is the test set),
    against an estimator fitted on the whole target stage table: total MAPE per N, and the per-stage detail."""
    source = StageLatencyEstimator.fit(pair["source"])
    reference = StageLatencyEstimator.fit(pair["target_table"], prefill_bucket=pair["target_bucket"])
    target = pair["target"].reset_index(drop=True)
    curves: dict = {m: {} for m in METHODS}
    detail: dict = {m: {} for m in (*METHODS, "target_stage_table")}
    for n in NS:
        if n >= len(target) - 10:
            continue
        acc: dict = {}
        for seed in range(seeds):
            rng = np.random.default_rng(1000 + seed)
            idx = rng.permutation(len(target))
            cal, test = target.iloc[idx[:n]], target.iloc[idx[n:]]
            predictors = {m: recalibrate(source, cal, m, prefix="measured_", ridge=ridge, prefill_bucket=pair["target_bucket"])
                          for m in METHODS}
            predictors["target_stage_table"] = reference
            for m, predictor in predictors.items():
                pred = predictor.predict_frame(test)
                for col in (*[f"{s}_ms" for s in STAGES], "total_ms"):
                    ape, _ = errors(pred[col], test[f"measured_{col}"])
                    acc.setdefault((m, col), []).append(ape)
        for (m, col), apes in acc.items():
            per_seed = [float(np.mean(a)) for a in apes]
            entry = detail[m].setdefault(str(n), {})
            entry[col] = {"mape_mean": float(np.mean(per_seed)), "mape_std": float(np.std(per_seed)),
                          "p95_ape": float(np.percentile(np.concatenate(apes), 95))}
            if col == "total_ms" and m in curves:
                curves[m][str(n)] = float(np.mean(per_seed))
    return curves, {"target_set": pair["target_set"], "n_target_requests": len(target), "seeds": seeds,
                    "ridge": ridge, "per_method": detail,
                    "source_coefficients": source.to_dict()["coefficients"]}


# ---------------------------------------------------------------------------- figures

def scatter_table(scatters: list[dict], points: int = SCATTER_POINTS, seed: int = 0) -> pd.DataFrame:
    """The same-device scatters (`same_device`'s second result) as one table, each set subsampled to `points`
    rows with a seeded draw (`set_rows`: how many it had)."""
    rng = np.random.default_rng(seed)
    parts = []
    for sc in scatters:
        keep = np.sort(rng.permutation(len(sc["measured_total_ms"]))[:points])
        parts.append(pd.DataFrame({"set": sc["name"], "measured_total_ms": np.asarray(sc["measured_total_ms"], float)[keep],
                                   "predicted_total_ms": np.asarray(sc["predicted_total_ms"], float)[keep],
                                   "set_rows": len(sc["measured_total_ms"])}))
    return pd.concat(parts, ignore_index=True)


def plot(recal_detail: dict, scatters: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """`e3_error_vs_n.png` (recalibration: total MAPE against the target requests N, per method and pair)
    and `e3_predicted_vs_actual.png` (same device: the stage estimator on held-out configurations)."""
    import matplotlib.ticker

    plt = pyplot()
    written = []
    fig, axes = plt.subplots(1, len(recal_detail), figsize=(4.5 * len(recal_detail), 3.6), squeeze=False)
    for ax, (key, det) in zip(axes[0], recal_detail.items()):
        for m in (*METHODS, "target_stage_table"):
            ns = sorted(int(n) for n in det["per_method"][m])
            mean = [det["per_method"][m][str(n)]["total_ms"]["mape_mean"] for n in ns]
            std = [det["per_method"][m][str(n)]["total_ms"]["mape_std"] for n in ns]
            ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=m, linestyle="--" if m == "target_stage_table" else "-")
        ax.axhline(8, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(list(NS), [str(n) for n in NS])
        ax.set_xlabel("target calibration requests N")
        ax.set_ylabel("total MAPE on held-out target requests (%)")
        ax.set_title(key.replace("->", "\n-> "), fontsize=8)
    axes[0][0].legend(fontsize=7)
    written.append(save_figure(fig, Path(figures_dir) / "e3_error_vs_n.png", 120))
    names = list(dict.fromkeys(scatters["set"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = scatters[scatters["set"] == name]
        measured, pred = rows["measured_total_ms"].to_numpy(), rows["predicted_total_ms"].to_numpy()
        ax.scatter(measured, pred, s=4, alpha=0.4)
        lo, hi = min(measured.min(), pred.min()), max(measured.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], "k:", lw=0.6)
        ax.plot([lo, hi], [lo / 1.1, hi / 1.1], "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("measured total (ms)")
        ax.set_ylabel("predicted total (ms)")
        ax.set_title(f"{name}\n(held-out configs, split 0; {len(rows):,} of {rows['set_rows'].iloc[0]:,} rows)", fontsize=8)
    written.append(save_figure(fig, Path(figures_dir) / "e3_predicted_vs_actual.png", 120))
    return written


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "e3_summary.json").read_text())
    scatters = pd.read_parquet(results_dir / "e3_scatter.parquet")
    return plot(summary["recalibration_detail"], scatters, figures_path(results_dir, figures_dir))
