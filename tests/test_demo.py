"""The README's main job, `flexvlm-demo`, runs end to end on the shipped micro model."""
from __future__ import annotations

import re

import pytest

from flexvlm_env import demo


def test_demo_prints_the_knob_table_and_an_episode(capsys):
    assert demo.main(["--device", "cpu", "--episode-steps", "2"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(tuple(demo.FAMILIES)) and "(ref " in line]
    assert len(table) == len(demo.FAMILIES) * len(demo.CONFIGS)  # one row per family x config
    episode = out.split("FlexVLM-v0 on cpu")[1].splitlines()
    steps = [line for line in episode if line.split("/")[0] in demo.FAMILIES]
    assert len(steps) == 2
    for line in steps:  # request, budget ms, (crops, top_k, blocks), latency ms, quality, reward [, over budget]
        budget_ms = float(line.split()[1])
        latency_ms, quality, reward = (float(v) for v in re.search(r"\)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)", line).groups())
        assert budget_ms > 0 and latency_ms > 0 and 0.0 <= quality <= 1.0 and reward <= quality
        if abs(latency_ms - budget_ms) > 0.1:  # printed to 0.1 ms
            assert ("over budget" in line) == (latency_ms > budget_ms)


@pytest.mark.parametrize("argv, message", [(["--requests", "0"], "--requests=0 must be >= 1"),
                                           (["--episode-steps", "-1"], "--episode-steps=-1 must be >= 0"),
                                           (["--preset", "big"], "invalid choice: 'big'"),
                                           (["--device", "tpu"], "device='tpu' is not a valid torch device"),
                                           (["--weights", "nowhere/x.safetensors"], "--weights=nowhere/x.safetensors")])
def test_demo_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
