"""Recorded profiles: measurement tables (Parquet), the `flexvlm-profile` CLI that writes them, stage
tables composed per request, and the dense arrays the replay environment reads.

`load_replay_data(quality, latency)` and `simulate(request_id, config)` are the query API over the
shipped tables; `flexvlm-profile` (`cli.py`) measures new ones.
"""
from .loading import LATENCY_SOURCES, QUALITY_SOURCES, load_replay_data, simulate
from .replay import ReplayData

__all__ = ["LATENCY_SOURCES", "QUALITY_SOURCES", "ReplayData", "load_replay_data", "simulate"]
