"""W&B gets a run's log lines once a checkpoint covers them, so an interrupted and resumed run sends each step once.

A training run appends a line to its local JSONL log at every logging point and saves a checkpoint
now and then. A crash between the two leaves lines that the resumed run drops and logs again
(`loop.truncate_log`, `trainers.common.Run.resumed_from`): the local log can be rewritten, W&B's
history cannot. W&B refuses a step at or below one it already holds (with a warning), so a re-logged
point would keep the lost run's value, and the W&B curve would stop matching the local one.

`WandbLog` therefore sends lines only up to the step of the last saved checkpoint (`send_through`),
reading them from the local log itself, and records the last step it sent in a small JSON file beside
that log, so that a resumed process (or one that turns W&B on for the rest of a run) sends exactly
what its predecessors had not.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SENT_SUFFIX = ".wandb_sent.json"


class WandbLog:
    """The lines of `log_path` (JSONL, one record per line, each with an integer `step_key`) on their way to a W&B
    run (`wandb_run`; None: W&B is off and every call does nothing)."""

    def __init__(self, wandb_run: Any, log_path: str | Path, step_key: str):
        self.run = wandb_run
        self.log_path = Path(log_path)
        self.step_key = step_key
        self.sent_path = self.log_path.with_name(self.log_path.name + SENT_SUFFIX)

    def sent_step(self) -> float:
        """The last step W&B received (-inf: none yet)."""
        if not self.sent_path.exists():
            return -math.inf
        return float(json.loads(self.sent_path.read_text())["step"])

    def send_through(self, step: float = math.inf) -> int:
        """Send the log's lines with sent_step() < line step <= `step` (inf: every line, when the run is done), in
        order; the number sent."""
        if self.run is None or not self.log_path.exists():
            return 0
        sent = self.sent_step()
        records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        new = sorted((r for r in records if sent < r[self.step_key] <= step), key=lambda r: r[self.step_key])
        for record in new:
            self.run.log(record, step=int(record[self.step_key]))
        if new:
            # Written after the sends: a crash in between re-sends a line W&B then refuses as a repeat (same
            # values, from the same local line), where the other order could lose one.
            self.sent_path.write_text(json.dumps({"step": int(new[-1][self.step_key])}) + "\n")
        return len(new)
