"""Recorded profiles: measurement tables (Parquet), the `flexvlm-profile` CLI that writes them, stage
tables composed per request, and the dense arrays the replay environment reads."""
