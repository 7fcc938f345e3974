"""Pieces every FlexVLM training script shares: the warmup-stable-decay learning rate, the
deduplicated JSON-lines log, and the per-window statistics that go into it.

`scripts/train_micro.py` (training from scratch) and `scripts/finetune_lora.py` (LoRA adapters)
drive the same stream of knob-drawn batches; keeping their schedule and log format here means
their learning curves can be compared line for line (and in W&B, under the same keys).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info


def wsd_learning_rate(step: int, peak_lr: float, warmup_steps: int, total_steps: int, decay_frac: float, min_lr_frac: float) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a cosine decay over the last
    `decay_frac` of `total_steps` to `min_lr_frac * peak_lr`. The plateau lets a run be extended
    (more total steps) on resume as long as the decay has not started."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_start = int(total_steps * (1 - decay_frac))
    if step < decay_start:
        return peak_lr
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return peak_lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def loss_summary(record: dict) -> str:
    """The console form of a log record's losses: `full 1.063 prefix 1.107 ...`, one entry per
    configuration kind the window drew (a window need not hold every kind)."""
    return " ".join(f"{key[3:]} {value:.3f}" for key, value in record.items() if key.startswith("ce/"))


def append_log(path: Path, record: dict) -> None:
    with Path(path).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be logged again), so a
    resumed run's log has every step once."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", -1) <= step]
    path.write_text("".join(line + "\n" for line in lines))


class WindowStats:
    """Answer cross-entropy per knob-draw kind and per family, plus gradient norm and router
    balance, accumulated on the device between log lines (no host sync per step) and reduced
    across data-parallel processes when read."""

    def __init__(self, families: tuple[str, ...], device):
        self.families = families
        self.by_kind: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.family_sum = torch.zeros(len(families), device=device)
        self.family_count = torch.zeros(len(families), device=device)

    def add(self, kind: str, ce: torch.Tensor, labels: torch.Tensor, family: torch.Tensor, grad_norm: torch.Tensor, balance: torch.Tensor) -> None:
        """ce [B, L] per-token CE (0 off-target) and labels [B, L] of one step; family [B]."""
        tokens = (labels >= 0).sum(1).clamp(min=1)
        per_sample = (ce.sum(1) / tokens).float()
        self.by_kind[kind].append(torch.stack([per_sample.mean(), grad_norm.float(), balance.float()]))
        self.family_sum.index_add_(0, family, per_sample)
        self.family_count.index_add_(0, family, torch.ones_like(per_sample))

    def read(self, reduce=lambda tensor: tensor) -> dict[str, float | None]:
        """Keys `ce/<kind>`, `grad_norm/<kind>`, `balance/<kind>`, `ce_family/<family>`; then reset.
        A family no process drew in the window has `ce_family/<family>` None (JSON null): 0.0 would read as a
        perfect loss. `reduce` averages a tensor across processes in place (identity in one process)."""
        record: dict[str, float | None] = {}
        for kind, values in sorted(self.by_kind.items()):
            mean = reduce(torch.stack(values).mean(0))  # every process draws the same kinds
            record[f"ce/{kind}"], record[f"grad_norm/{kind}"], record[f"balance/{kind}"] = mean.tolist()
        reduce(self.family_sum)  # a ratio of means is the ratio of sums
        reduce(self.family_count)
        means = (self.family_sum / self.family_count.clamp(min=1)).tolist()
        for name, mean, count in zip(self.families, means, self.family_count.tolist()):
            record[f"ce_family/{name}"] = mean if count > 0 else None
        self.by_kind.clear()
        self.family_sum.zero_()
        self.family_count.zero_()
        return record


class StepStream(IterableDataset):
    """Batches `start_step, start_step + 1, ...` (forever) of a pure function `batch(step)`; with
    DataLoader workers, worker w builds the steps congruent to w and the loader interleaves them
    back into step order, so a resumed run continues with the very batch it stopped at."""

    start_step: int = 0

    def batch(self, step: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers
