"""Quality of a model over a fixed set of requests at given knob settings.

`QualityEvaluator` answers every request greedily in batches (`VLM.generate_prepared`) and scores
the answers with each sample's metric. Preprocessing depends only on the crops knob, so prepared
requests are kept for the last crops value: sweep configurations crops-major and each request is
prepared once per crops value.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import Config
from .metrics import score
from .model.runtime import VLM
from .tasks.sample import Sample


class QualityEvaluator:
    def __init__(self, vlm: VLM, samples: Sequence[Sample], batch_size: int = 256):
        if not samples:
            raise ValueError("samples is empty; the evaluator needs at least one request")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.vlm, self.samples, self.batch_size = vlm, list(samples), batch_size
        self._prepared_key = None
        self._prepared: list = []

    def _prepare(self, config: Config) -> list:
        key = (config.crops, config.crop_rule)
        if key != self._prepared_key:
            self._prepared = []  # release the previous crops value's tensors first
            self._prepared = [self.vlm.prepare(s.image, s.prompt, config) for s in self.samples]
            self._prepared_key = key
        return self._prepared

    def results(self, config: Config, plan: Sequence[int] | None = None) -> list:
        """Greedy `GenerationResult`s (text, tokens; no latency), one per sample, at `config` (or
        with an explicit block `plan`)."""
        prepared = self._prepare(config)
        results: list = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            budgets = [s.max_new_tokens for s in self.samples[chunk]]
            results.extend(self.vlm.generate_prepared(prepared[chunk], config, budgets, plan=plan))
        return results

    def answers(self, config: Config, plan: Sequence[int] | None = None) -> list[str]:
        """Greedy answer texts, one per sample, at `config` (or with an explicit block `plan`)."""
        return [r.text for r in self.results(config, plan)]

    def scores(self, config: Config, plan: Sequence[int] | None = None) -> np.ndarray:
        """Per-sample quality in [0, 1] at `config`."""
        texts = self.answers(config, plan)
        return np.array([score(sample, text) for sample, text in zip(self.samples, texts)])
