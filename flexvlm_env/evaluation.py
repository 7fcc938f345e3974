"""Quality of a model over a fixed set of requests at given knob settings.

`QualityEvaluator` answers every request greedily in batches (`VLM.generate_prepared`) and scores
the answers with each sample's metric. Preprocessing depends only on the crops knob, so prepared
requests are kept for the last crops value: sweep configurations crops-major and each request is
prepared once per crops value. The kept requests are bounded by `max_cached_bytes`: beyond it each
batch is prepared when it is answered and dropped after (a 224 px micro keeps about 8 MB of float32
patches per 12-crop request, so 1 800 kept requests alone filled this project's 24 GiB machine).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import Config
from .metrics import score
from .model.runtime import VLM
from .tasks.sample import Sample


DEFAULT_MAX_CACHED_BYTES = 4 * 2**30


def prepared_bytes(prepared) -> int:
    """Host or device bytes held by one `PreparedRequest` (its ids and image tensors)."""
    tensors = [prepared.input_ids]
    if prepared.image is not None:
        tensors += [prepared.image.images, prepared.image.image_masks, prepared.image.image_input_idx]
    return sum(t.numel() * t.element_size() for t in tensors)


class QualityEvaluator:
    def __init__(self, vlm: VLM, samples: Sequence[Sample], batch_size: int = 256,
                 max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES):
        if not samples:
            raise ValueError("samples is empty; the evaluator needs at least one request")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_cached_bytes < 0:
            raise ValueError(f"max_cached_bytes={max_cached_bytes} must be >= 0 (0: prepare every batch when answered)")
        self.vlm, self.samples, self.batch_size, self.max_cached_bytes = vlm, list(samples), batch_size, max_cached_bytes
        self._prepared_key = None
        self._prepared: list = []

    def _prepare(self, samples: Sequence[Sample], config: Config) -> list:
        return [self.vlm.prepare(s.image, s.prompt, config) for s in samples]

    def _batches(self, config: Config):
        """(slice, prepared requests) per batch, from the kept requests when they fit the budget."""
        key = (config.crops, config.crop_rule)
        if key != self._prepared_key:
            self._prepared, self._prepared_key = [], None  # release the previous crops value's tensors first
            first = self._prepare(self.samples[:1], config)
            if prepared_bytes(first[0]) * len(self.samples) <= self.max_cached_bytes:
                self._prepared = first + self._prepare(self.samples[1:], config)
                self._prepared_key = key
        for start in range(0, len(self.samples), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            yield chunk, self._prepared[chunk] if self._prepared_key == key else self._prepare(self.samples[chunk], config)

    def batch_results(self, config: Config, plan: Sequence[int] | None = None):
        """(slice of `samples`, their greedy `GenerationResult`s) batch by batch at `config`: a caller that keeps
        each batch as it comes (`profiles.sweeps.profile_quality`) loses at most one batch to an interruption."""
        for chunk, prepared in self._batches(config):
            budgets = [s.max_new_tokens for s in self.samples[chunk]]
            yield chunk, self.vlm.generate_prepared(prepared, config, budgets, plan=plan)

    def results(self, config: Config, plan: Sequence[int] | None = None) -> list:
        """Greedy `GenerationResult`s (text, tokens; no latency), one per sample, at `config` (or
        with an explicit block `plan`)."""
        return [result for _, batch in self.batch_results(config, plan) for result in batch]

    def answers(self, config: Config, plan: Sequence[int] | None = None) -> list[str]:
        """Greedy answer texts, one per sample, at `config` (or with an explicit block `plan`)."""
        return [r.text for r in self.results(config, plan)]

    def scores(self, config: Config, plan: Sequence[int] | None = None) -> np.ndarray:
        """Per-sample quality in [0, 1] at `config`."""
        texts = self.answers(config, plan)
        return np.array([score(sample, text) for sample, text in zip(self.samples, texts)])
