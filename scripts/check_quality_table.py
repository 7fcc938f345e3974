"""Re-answer part of a recorded quality table on this machine and compare with what it holds.

A quality table (`flexvlm-profile quality`) is answered on a GPU in large greedy batches; the
replay environment then serves those answers as if the model had given them. Before a table
ships, this check re-answers evenly spaced requests of every family at a few configurations
here (default: float32 on the CPU, the embedded default's own path) and reports how many answers
and scores agree. A greedy answer can legitimately flip where two tokens tie within rounding, so
the check reports; `--min-agreement` turns it into a gate (exit status 1 below it).

    python scripts/check_quality_table.py --table flexvlm_env/assets/profiles/micro_quality_val.parquet \
        --per-family 12 --out results/micro_quality_table_check_cpu.json
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from flexvlm_env import load_model
from flexvlm_env.config import Config
from flexvlm_env.evaluation import QualityEvaluator
from flexvlm_env.metrics import score
from flexvlm_env.profiles.sweeps import RequestPool
from flexvlm_env.profiles.tables import read_table


@dataclass
class Args:
    table: str
    """quality table: a Parquet file or a sharded table directory"""
    weights: str | None = None
    """the weights that answered it (default: the shipped micro weights); their hash must match the table's"""
    per_family: int = 12
    """requests re-answered per family, evenly spaced over the table's pool"""
    configs: tuple[str, ...] = ("12,8,16", "4,2,10", "1,1,8")
    """configurations as crops,top_k,active_blocks; each must be in the table"""
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    """requests per greedy batch here"""
    min_agreement: float = 0.0
    """exit with status 1 when the fraction of equal answers is below this"""
    out: str | None = None
    """JSON report path (default: print only)"""

    def __post_init__(self) -> None:
        if self.per_family < 1:
            raise ValueError(f"--per-family={self.per_family} must be >= 1")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement={self.min_agreement} must be in [0, 1]")
        self.parsed_configs  # a malformed --configs entry fails here, before anything loads

    @property
    def parsed_configs(self) -> list[Config]:
        return [parse_config(text) for text in self.configs]


def parse_config(text: str) -> Config:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--configs entry {text!r} must be crops,top_k,active_blocks (three integers), e.g. 12,8,16")
    crops, top_k, blocks = (int(p) for p in parts)
    return Config(crops=crops, top_k=top_k, active_blocks=blocks)


def evenly_spaced(ids: list[str], count: int) -> list[str]:
    """`count` of `ids` (all when fewer), spread over the whole list."""
    if count >= len(ids):
        return list(ids)
    return [ids[round(i * (len(ids) - 1) / (count - 1))] for i in range(count)] if count > 1 else [ids[0]]


def main(args: Args) -> dict:
    started = time.perf_counter()
    frame = read_table(args.table)
    meta = frame.attrs.get("metadata", {})
    if meta.get("kind") != "quality":
        raise ValueError(f"--table {args.table} is a {meta.get('kind')!r} table, not a quality table")
    vlm = load_model(meta.get("preset", "micro"), args.weights, device=args.device, dtype=args.dtype)
    if vlm.weights_sha256 != meta.get("weights_sha256"):
        raise ValueError(f"--weights answer as {vlm.weights_sha256}, but --table {args.table} was answered by "
                         f"{meta.get('weights_sha256')}: pass the weights that answered it")
    pool_meta = meta["protocol"]["pool"]  # RequestPool's fields, as the table recorded them
    pool = RequestPool(**{**pool_meta, "families": tuple(pool_meta["families"])})
    samples = pool.samples()
    chosen = set()
    for family in pool.families:
        chosen.update(evenly_spaced([s.request_id for s in samples if s.family == family], args.per_family))
    subset = [s for s in samples if s.request_id in chosen]
    recorded = frame.set_index(["request_id", "crops", "top_k", "active_blocks"])
    evaluator = QualityEvaluator(vlm, subset, batch_size=args.batch_size)

    rows = []
    for config in args.parsed_configs:
        keys = [(s.request_id, config.crops, config.top_k, config.active_blocks) for s in subset]
        missing = [k for k in keys if k not in recorded.index]
        if missing:
            raise ValueError(f"--configs {config.crops},{config.top_k},{config.active_blocks} is not in --table "
                             f"{args.table} for {len(missing)} of the chosen requests (first: {missing[0][0]})")
        answers = evaluator.answers(config)
        mismatches = []
        scores_equal = 0
        for sample, key, answer in zip(subset, keys, answers):
            table_answer, table_quality = recorded.loc[key, "answer"], float(recorded.loc[key, "quality"])
            scores_equal += abs(score(sample, answer) - table_quality) < 1e-6
            if answer != table_answer:
                mismatches.append({"request_id": sample.request_id, "table": table_answer, "here": answer})
        rows.append({"crops": config.crops, "top_k": config.top_k, "active_blocks": config.active_blocks,
                     "requests": len(subset), "answers_equal": len(subset) - len(mismatches),
                     "scores_equal": int(scores_equal), "mismatches": mismatches})
        print(f"({config.crops}, {config.top_k}, {config.active_blocks}): {rows[-1]['answers_equal']}/{len(subset)} "
              f"answers, {int(scores_equal)}/{len(subset)} scores equal", flush=True)

    compared = sum(r["requests"] for r in rows)
    agreement = sum(r["answers_equal"] for r in rows) / compared
    report = {
        "table": str(args.table),
        "table_device": meta.get("device_name"),
        "table_dtype": meta.get("dtype"),
        "weights_sha256": vlm.weights_sha256,
        "checked_on": {"device": args.device, "dtype": args.dtype, "machine": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
        "requests_per_family": args.per_family,
        "configs": rows,
        "answers_compared": compared,
        "answer_agreement": agreement,
        "wall_s": time.perf_counter() - started,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{sum(r['answers_equal'] for r in rows)} of {compared} answers equal the table's ({agreement:.1%})")
    return report


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    result = main(cli_args)
    sys.exit(0 if result["answer_agreement"] >= cli_args.min_agreement else 1)
