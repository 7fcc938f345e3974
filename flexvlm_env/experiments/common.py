"""Helpers every experiment shares: run provenance, Pareto frontiers, summary files, figure saving."""
from __future__ import annotations

import gzip
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..benchmarking import distribution_summary
from ..figures import _pyplot as pyplot
from ..figures import _save as save_figure

# Re-exported so every experiment module takes them from here: the latency protocol's statistics,
# pyplot on the file-only Agg backend, and the shared figure saver.
__all__ = ["distribution_summary", "pyplot", "save_figure", "frontier_quality_at", "machine", "pareto_frontier",
           "run_header", "versions", "write_json"]


def versions() -> dict[str, str]:
    """Versions of the packages results depend on (those importable here)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "pandas", "gymnasium", "stable_baselines3", "sb3_contrib", "trl", "transformers"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        out[name] = getattr(module, "__version__", "unknown")
    return out


def machine() -> dict[str, Any]:
    """The host a CPU-side analysis ran on (GPU runs record `benchmarking.device_info` instead). On Linux also the
    CPU family and model and whether it has AVX-512: two hosts with one model name ("AMD EPYC") can differ there,
    and with them the floating-point path of a training run (a short GRPO run's outcome moved with it)."""
    import os

    out = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return out
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    out["cpu"] = fields.get("model name", out["cpu"])
    for key in ("cpu family", "model"):
        if key in fields:
            out[f"cpu_{key.split()[-1]}"] = fields[key]
    if "flags" in fields:
        out["avx512"] = "avx512f" in fields["flags"].split()
    return out


def parse_script_args(cls: type, validate: Callable[[Any], None] | None = None) -> Any:
    """A driver's arguments from the command line (tyro), checked before any work: a ValueError or a
    `SystemExit(message)` raised by `validate(args)` (default: `args.validate()`, if the class has one) is a usage
    error, one line on stderr and exit status 2, as for `flexvlm-train` and `flexvlm-profile`."""
    import tyro

    args = tyro.cli(cls)
    check = (lambda: validate(args)) if validate is not None else getattr(args, "validate", None)
    if check is not None:
        try:
            check()
        except (ValueError, SystemExit) as error:
            if isinstance(error, SystemExit) and not isinstance(error.code, str):
                raise
            print(f"{Path(sys.argv[0]).name}: error: {error.code if isinstance(error, SystemExit) else error}",
                  file=sys.stderr)
            raise SystemExit(2) from None
    return args


QUICK_SUBDIR = "quick"  # results/quick/ (git-ignored)


def quick_out_dir(args: Any, field: str = "out_dir") -> None:
    """With `--quick` and the default output folder, write under its `quick/` subfolder: a smoke run never overwrites
    the committed full run, whose files later analyses read (E6 reads M5's and M6's summaries, E1 and M2 re-analyse
    every raw file in the folder). An output folder given explicitly is used as given."""
    default = Path(getattr(type(args), field))
    if getattr(args, "quick", False) and Path(getattr(args, field)) == default:
        setattr(args, field, default / QUICK_SUBDIR)


def run_header(experiment: str, args: Any = None, **extra: Any) -> dict[str, Any]:
    """What every `results/<id>_summary.json` starts with: experiment id, date, machine, versions,
    the arguments used (a dataclass or dict) and any data sources or devices passed as `extra`."""
    from dataclasses import asdict, is_dataclass

    arguments = asdict(args) if is_dataclass(args) else (dict(args) if args else {})
    return {"experiment": experiment, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "versions": versions(),
            "args": json.loads(json.dumps(arguments, default=str)), **extra}


def figures_path(results_dir: str | Path, figures_dir: str | Path | None = None) -> Path:
    """Where `plot_from_results` writes: `figures_dir`, or the committed figures under `results_dir/figures`
    (`scripts/make_figures.py`). The notebooks draw elsewhere: re-drawing a committed PNG rewrites its bytes (the
    same pixels), which would show as a change in every rebuild."""
    return Path(figures_dir) if figures_dir is not None else Path(results_dir) / "figures"


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, gunzipped first when its name ends in ".gz" (how raw device files are kept
    in results/: they are large and only read by the analyses)."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    return json.loads(path.read_text())


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `payload` as indented JSON (NumPy scalars and arrays converted), creating the folder; gzipped, compact
    and byte-reproducible (no timestamp in the header) when the name ends in ".gz", as the data files behind
    figures are kept (the summaries people read stay plain)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        text = json.dumps(payload, separators=(",", ":"), default=_to_builtin)
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as handle:
            handle.write(text.encode("utf-8"))
        return path
    path.write_text(json.dumps(payload, indent=1, default=_to_builtin) + "\n")
    return path


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def pareto_frontier(latency_ms, quality) -> np.ndarray:
    """Indices of the non-dominated points (lower latency and higher quality are better), sorted by
    latency: a point is on the frontier when no other point is at most as slow and strictly better,
    or strictly faster and at least as good. Ties in both keep the first index."""
    latency_ms = np.asarray(latency_ms, dtype=float)
    quality = np.asarray(quality, dtype=float)
    if latency_ms.shape != quality.shape or latency_ms.ndim != 1:
        raise ValueError(f"latency_ms and quality must be 1-D of equal length, got {latency_ms.shape} and {quality.shape}")
    order = np.lexsort((-quality, latency_ms))  # by latency, best quality first among equal latencies
    frontier, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            frontier.append(int(i))
            best = quality[i]
    return np.asarray(frontier, dtype=np.int64)


def frontier_quality_at(latency_ms, quality, at_latency_ms) -> np.ndarray:
    """The frontier's best quality reachable within each latency in `at_latency_ms` (a step
    function; NaN below the fastest point): how two frontiers are compared 'at equal latency'."""
    idx = pareto_frontier(latency_ms, quality)
    lat, q = np.asarray(latency_ms, float)[idx], np.asarray(quality, float)[idx]
    at = np.atleast_1d(np.asarray(at_latency_ms, dtype=float))
    pos = np.searchsorted(lat, at, side="right") - 1
    return np.where(pos >= 0, q[np.clip(pos, 0, None)], np.nan)
