"""Issue [lora]: compare full-config-only, LoRA knob-robust and elastic `micro` over the knob grid.

    python scripts/lora_compare.py                       # from the committed tables in results/lora/
    python scripts/lora_compare.py --pack full-config-only=runs/lora/quality_base.parquet,runs/lora_cpu/base_full ...

Reads one quality table per model (`--tables NAME=PATH`, see `flexvlm_env.experiments.lora`),
composes each configuration's latency from the replay stage tables with the model's own answer
lengths, and writes `results/lora_summary.json` (per model and configuration: knobs, mean quality,
latency; `gap_recovered`, `full_config_delta`, the bars, adapter sizes and training costs) and
`results/figures/lora_frontiers.png`. `--pack NAME=SRC[,SRC...]` first merges a model's raw
tables (GPU sweep + CPU fill-in, first source winning) into `results/lora/quality_NAME.parquet`.

How the tables were made (scripts/lora_gpu.sh on a lent 4-GPU machine, then CPU fill-in):
    torchrun --nproc-per-node 4 scripts/train_micro.py --no-elastic --compile --total-steps 3500 \\
        --decay-frac 0.3 --run-dir runs/micro_full_only --export-dir runs/micro_full_only/export
    BASE=runs/micro_full_only/export/model.safetensors scripts/lora_gpu.sh runs/lora     # unanchored variants
    BASE=... PLAN=anchor scripts/lora_gpu.sh runs/lora_anchor                            # anchored + selection
    BASE=... PLAN=grid ADAPTER=runs/lora_anchor/r16_anchor4/adapter scripts/lora_gpu.sh runs/lora_anchor
The headline (`--headline`) is the variant that selection.json names; the variants answered at the
full configuration only are reported there (`full_only`), and `full_config_paired` gives every
model's request-paired change at full against the base.

The study belongs to the first micro (112-px crops, weights b47291b9, the default until
2026-11-28): its elastic model's quality table, the request table with its token counts and its
H100 stage table are archived beside the LoRA tables (`results/lora/quality_elastic-micro112.parquet`,
`results/lora/requests_val_micro112.parquet`, `results/device_tables/micro112_h100_stages.parquet`), so
the comparison reproduces without the shipped (224-px) micro's tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro

from flexvlm_env.experiments import lora
from flexvlm_env.experiments.common import run_header, write_json

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "lora"
REQUESTS_MICRO112 = TABLES / "requests_val_micro112.parquet"
STAGES_MICRO112 = ROOT / "results" / "device_tables" / "micro112_h100_stages.parquet"


@dataclass
class Args:
    tables: tuple[str, ...] = (
        f"full-config-only={TABLES / 'quality_full-config-only.parquet'}",
        f"lora-r16-anchor4={TABLES / 'quality_lora-r16-anchor4.parquet'}",
        f"lora-r16={TABLES / 'quality_lora-r16.parquet'}",
        f"lora-r4={TABLES / 'quality_lora-r4.parquet'}",
        f"lora-r16+vision={TABLES / 'quality_lora-r16+vision.parquet'}",
        f"elastic={TABLES / 'quality_elastic-micro112.parquet'}",
        f"lora-r16-anchor16={TABLES / 'quality_lora-r16-anchor16.parquet'}",
        f"lora-r16-anchor64={TABLES / 'quality_lora-r16-anchor64.parquet'}",
        f"lora-r16-anchor16-pfull40={TABLES / 'quality_lora-r16-anchor16-pfull40.parquet'}",
    )
    """NAME=PATH per model (a Parquet file or a table directory); a model answered at the full
    configuration only (a variant not chosen for the full sweep) is reported there alone"""
    adapters: tuple[str, ...] = (
        f"lora-r16-anchor4={TABLES / 'adapters/lora-r16-anchor4'}",
        f"lora-r16={TABLES / 'adapters/lora-r16'}",
        f"lora-r4={TABLES / 'adapters/lora-r4'}",
        f"lora-r16+vision={TABLES / 'adapters/lora-r16+vision'}",
    )
    """NAME=DIR of each adapter (or of its flexvlm_adapter.json): size and training cost"""
    selection: Path | None = TABLES / "anchor_selection.json"
    """selection.json of `PLAN=anchor scripts/lora_gpu.sh` (how the headline was chosen among the
    anchored variants, on another request pool); its variant `X_Y` is the model `lora-X-Y` here"""
    base_card: Path = TABLES / "full-config-only_model.json"
    """model.json of the full-config-only base (its training record)"""
    pack: tuple[str, ...] = ()
    """NAME=SRC[,SRC...]: merge these raw tables into results/lora/quality_NAME.parquet first"""
    base: str = "full-config-only"
    reference: str = "elastic"
    headline: str = "lora-r16-anchor4"
    """the adapter the issue's bars are read on (the others are size / target ablations)"""
    out_dir: Path = ROOT / "results"


def _pairs(entries: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--{option} entry {entry!r} must be NAME=PATH")
        out[name] = value
    return out


def adapter_record(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path if path.suffix == ".json" else path / "flexvlm_adapter.json"
    meta = json.loads(meta_file.read_text())
    weights = meta_file.parent / "adapter_model.safetensors"
    training = meta["training"]
    return {"spec": meta["spec"], "parameters": meta["adapter_parameters"],
            "tensor_bytes_fp32": 4 * meta["adapter_parameters"],
            # None where the weights are not committed (the repository's size is capped)
            "file_bytes": weights.stat().st_size if weights.exists() else None,
            "base_weights_sha256": meta["base_weights_sha256"], "mask_policy": training["args"]["mask_policy"],
            "steps": training["step"], "requests": training["samples"], "train_seconds": training["train_seconds"],
            "device": training["device"], "lr": training["args"]["lr"], "batch_size": training["args"]["batch_size"]}


def _selection(path: Path | None) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    record = json.loads(Path(path).read_text())
    rename = {name: "lora-" + name.replace("_", "-") for name in record["candidates"]}
    return {**record, "selected": rename[record["selected"]], "file": str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT) else str(path),
            "pool": "procedural val, --task-seed 1 (not the reported pool), 200 requests per family, "
                    "crops {1, 12} x top_k {1, 8} x active_blocks {8, 16}",
            "candidates": {rename[name]: value for name, value in record["candidates"].items()}}


def main(args: Args) -> dict:
    for name, sources in _pairs(args.pack, "pack").items():
        written = lora.pack_tables(sources.split(","), TABLES / f"quality_{name}.parquet")
        print(f"packed {name}: {written}")
    tables = _pairs(args.tables, "tables")
    adapters = {name: adapter_record(path) for name, path in _pairs(args.adapters, "adapters").items() if name in tables}
    from flexvlm_env.profiles.tables import read_table

    requests = read_table(REQUESTS_MICRO112)
    stages = read_table(STAGES_MICRO112)
    models, configs, raw = {}, {}, {}
    for name, path in tables.items():
        frame, provenance = lora.load_quality([path])
        raw[name] = frame
        per_config = lora.config_quality(frame).merge(
            lora.config_latency(frame, lora.composed_latency_ms(frame, requests, stages)), on=lora.KNOBS)
        configs[name] = per_config
        models[name] = {"sources": provenance[0].get("merged_from") or provenance, "adapter": adapters.get(name),
                        "configs": per_config.to_dict(orient="records")}
    # Variants answered at the full configuration only are reported there, not in the gap.
    full_only = [name for name in tables if name not in (args.base, args.reference) and len(configs[name]) == 1]
    adapted = [name for name in tables if name not in (args.base, args.reference, *full_only)]
    comparison = lora.compare(configs, args.base, args.reference, adapted)
    # The frontier figure compares the base, the reference and the headline on the configs all three have.
    shared = sorted(set.intersection(*(set(map(tuple, configs[n][lora.KNOBS].to_numpy().tolist()))
                                       for n in (args.base, args.reference, args.headline))))
    head = comparison["per_model"][args.headline]
    base_card = json.loads(args.base_card.read_text()) if args.base_card.exists() else None
    summary = {
        **run_header("lora", args, latency_source="micro-h100 of the first micro (composed from its H100 stage table, each model's own answer lengths)"),
        "base": args.base, "reference": args.reference, "headline": args.headline, "adapted": adapted,
        "full_config": list(lora.FULL), "comparison_configs": [list(c) for c in shared],
        "gap_recovered": head["gap_recovered"], "full_config_delta": head["full_config_delta"],
        "bars": {"gap_recovered_at_least_0.5": head["gap_recovered"] >= 0.5,
                 "full_config_drop_at_most_1_point": head["full_config_delta"] >= -0.01},
        "comparison": comparison, "sweeps": lora.sweeps(configs),
        "full_config_paired": {name: lora.full_config_paired(raw[name], raw[args.base]) for name in tables if name != args.base},
        "full_only": {name: {"full_quality": comparison["full"][name],
                             "full_config_delta": comparison["full"][name] - comparison["full"][args.base]} for name in full_only},
        "variant_selection": _selection(args.selection),
        "base_training": base_card and {k: base_card[k] for k in ("sha256", "parameters", "training", "block_ranking") if k in base_card},
        "models": models,
    }
    write_json(args.out_dir / "lora_summary.json", summary)
    figures = lora.plot_from_results(args.out_dir)
    print(json.dumps({"per_model": {n: {k: round(v[k], 4) for k in ("gap_recovered", "full_config_delta", "reduced_configs")}
                                    for n, v in comparison["per_model"].items()},
                      "full": {n: round(v, 4) for n, v in comparison["full"].items()}, "figures": [str(f) for f in figures]}, indent=1))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
