"""Stage timing of one request: the latency record every request returns.

Stages are delimited by marks. On CUDA a mark records an event on the current stream (no
synchronisation); the events are read once, after the request's last token. On CPU a mark reads
`perf_counter`. The host clock also times the whole request, so the record can show that the stages
add up to the end-to-end time. With timing disabled the marks cost nothing and the record holds
only the end-to-end time (stage fields are 0).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

STAGES = ("preprocess", "vision_encoder", "projector", "prefill", "decode")
STAGE_FIELDS = tuple(f"{stage}_ms" for stage in STAGES)  # LatencyRecord's per-stage fields, in order


@dataclass
class LatencyRecord:
    """Milliseconds per stage of one request. `prefill_ms` includes the LM head and the first token."""

    preprocess_ms: float
    vision_encoder_ms: float
    projector_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    decode_ms_per_token: list[float] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        """Time to first token on the device: vision encoder + projector + prefill (host
        preprocessing excluded, as in the runtime targets; `total_ms` includes it)."""
        return self.vision_encoder_ms + self.projector_ms + self.prefill_ms

    @property
    def stage_sum_ms(self) -> float:
        return self.preprocess_ms + self.ttft_ms + self.decode_ms

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ttft_ms"] = self.ttft_ms
        return out


class StageTimer:
    """Collect stage boundaries; `finish()` turns them into a LatencyRecord."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.start_s = time.perf_counter()
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, stage: str) -> None:
        """Close `stage` now (the first mark, 'start', opens the request)."""
        if not self.enabled:
            return
        if self.cuda:
            # Preprocessing launches device work too (resize, patches), so on CUDA even the first
            # stage is measured on the device timeline, which also covers the host part before it.
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((stage, event))
        else:
            self.marks.append((stage, time.perf_counter()))

    def finish(self) -> LatencyRecord:
        if self.cuda:
            torch.cuda.synchronize()
        total_ms = (time.perf_counter() - self.start_s) * 1e3
        sums = dict.fromkeys(STAGES, 0.0)
        per_token: list[float] = []
        for (_, previous), (stage, current) in zip(self.marks, self.marks[1:]):
            elapsed = previous.elapsed_time(current) if self.cuda else (current - previous) * 1e3
            sums[stage] += elapsed
            if stage == "decode":
                per_token.append(elapsed)
        return LatencyRecord(
            preprocess_ms=sums["preprocess"],
            vision_encoder_ms=sums["vision_encoder"],
            projector_ms=sums["projector"],
            prefill_ms=sums["prefill"],
            decode_ms=sums["decode"],
            total_ms=total_ms,
            decode_ms_per_token=per_token,
        )
