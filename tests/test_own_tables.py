"""Your own `flexvlm-profile` tables in the replay env and the trainers: quality, latency and request tables by path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import flexvlm_env  # noqa: F401  (registers the envs)
from flexvlm_env.profiles import loading
from flexvlm_env.profiles.tables import ShardedTable, read_parquet, write_parquet

ARRAYS = ("quality", "answers", "total_ms", "stage_ms", "output_tokens", "noise_log_ratio", "prompt_features",
          "image_features")


def shipped(name: str, tmp_path: Path) -> str:
    """A copy of a shipped table at a path of its own (what `flexvlm-profile consolidate` writes)."""
    return str(shutil.copy(loading.profiles_dir() / name, tmp_path / name))


@pytest.mark.parametrize("source, table", [("micro-h200", "micro_h200_stages.parquet"),
                                           ("micro-h200-measured", "micro_h200_requests.parquet")])
def test_tables_given_by_path_replay_as_the_shipped_sources(source, table, tmp_path):
    """A stage table (latency composed) and a requests table (latency measured) by path, with the quality and
    request tables by path too, give the arrays of the shipped source they copy, and the same episodes."""
    own = loading.load_replay_data(quality=shipped("micro_quality_val.parquet", tmp_path),
                                   latency=shipped(table, tmp_path), requests=shipped("requests_val.parquet", tmp_path))
    ref = loading.load_replay_data(latency=source)
    assert own.request_ids == ref.request_ids and own.grid == ref.grid
    for name in ARRAYS:
        assert np.array_equal(getattr(own, name), getattr(ref, name)), name
    assert own.metadata["latency_source"] == str(Path(tmp_path / table).resolve())
    steps = []
    for env in (gym.make("FlexVLMReplay-v0", data=own), gym.make("FlexVLMReplay-v0", latency=source)):
        env.reset(seed=3)
        env.action_space.seed(3)
        steps.append([env.step(env.action_space.sample())[1:4] for _ in range(16)])  # one episode (16 requests)
    assert steps[0] == steps[1]


def two_family_quality_table(tmp_path: Path) -> Path:
    """The shipped quality table's tally_qa and doc_qa rows, as the shard directory `flexvlm-profile quality`
    leaves before it is consolidated."""
    frame, metadata = read_parquet(loading.profiles_dir() / "micro_quality_val.parquet")
    frame = frame[frame["family"].isin(["tally_qa", "doc_qa"])]
    table = ShardedTable(tmp_path / "my_quality", metadata["key"], metadata)
    half = len(frame) // 2
    table.append(frame.iloc[:half].to_dict("records"))
    table.append(frame.iloc[half:].to_dict("records"))
    return table.directory


def test_a_quality_table_of_two_families_in_shards_serves_them_in_the_env(tmp_path):
    directory = two_family_quality_table(tmp_path)
    env = gym.make("FlexVLMReplay-v0", quality=str(directory), latency="micro-h200", split="heldout")
    data = env.unwrapped.data
    assert sorted(set(data.families)) == ["doc_qa", "tally_qa"] and len(data.request_ids) == 400
    assert data.metadata["quality_source"] == str(directory.resolve())
    families = set()
    env.reset(seed=0)
    for _ in range(40):
        _, _, terminated, _, info = env.step(env.action_space.sample())
        families.add(info["family"])
        if terminated:
            env.reset()
    assert families == {"doc_qa", "tally_qa"}
    with pytest.raises(ValueError, match="families=.*has no requests in the replay data"):
        gym.make("FlexVLMReplay-v0", quality=str(directory), latency="micro-h200", families=["okvqa"])


def test_own_tables_that_cannot_replay_are_clear_errors(tmp_path):
    stages = shipped("micro_h200_stages.parquet", tmp_path)
    quality = shipped("micro_quality_val.parquet", tmp_path)
    with pytest.raises(ValueError, match=r"quality=.*holds a table of kind 'stages'; a quality table comes from "
                                         r"`flexvlm-profile quality`"):
        loading.load_replay_data(quality=stages, latency="micro-h200")
    with pytest.raises(ValueError, match=r"latency=.*holds a table of kind 'quality'"):
        loading.load_replay_data(latency=quality)
    requests, metadata = read_parquet(loading.profiles_dir() / "requests_val.parquet")
    partial = write_parquet(requests[requests["family"] != "mmmu"], tmp_path / "partial.parquet", metadata)
    with pytest.raises(ValueError, match=r"answers 200 requests that the request table .* does not hold.*"
                                         r"`flexvlm-profile request-table`"):
        loading.load_replay_data(quality=quality, latency=stages, requests=str(partial))
    micro_only = requests.drop(columns=[c for c in requests.columns if c.startswith("molmoe-1b/")])
    micro_only = write_parquet(micro_only, tmp_path / "micro_only.parquet", metadata)
    with pytest.raises(ValueError, match=r"composes molmoe-1b's latency, but the request table has no molmoe-1b token "
                                         r"counts.*--presets molmoe-1b"):
        loading.load_replay_data(latency=shipped("molmoe-1b_h100_stages.parquet", tmp_path), requests=str(micro_only))
    with pytest.raises(ValueError, match=r"requests='nowhere.parquet' is not an existing path"):
        loading.load_replay_data(requests="nowhere.parquet")


def with_pool(source: str, tmp_path: Path, name: str, **pool) -> str:
    """A copy of a shipped table whose metadata records another request pool (e.g. task_seed 1)."""
    frame, metadata = read_parquet(loading.profiles_dir() / source)
    holder = metadata["protocol"] if "protocol" in metadata else metadata
    holder["pool"] = {**holder["pool"], **pool}
    return str(write_parquet(frame, tmp_path / name, metadata))


def test_tables_of_different_request_pools_do_not_join(tmp_path):
    """Request ids name neither the task seed nor the split's generator: a quality table of another pool would join
    the shipped request table's features by id alone, and a measured latency table of another pool its latencies."""
    seed1 = with_pool("micro_quality_val.parquet", tmp_path, "q_seed1.parquet", task_seed=1)
    with pytest.raises(ValueError, match=r"quality=.*q_seed1.parquet' and the request table \(the shipped one\) were "
                                         r"made on different request pools \(task_seed 1 against 0\)"):
        gym.make("FlexVLMReplay-v0", quality=seed1)
    requests1 = with_pool("requests_val.parquet", tmp_path, "r_seed1.parquet", task_seed=1)
    data = loading.load_replay_data(quality=seed1, latency="micro-h200", requests=requests1)  # one pool: fine
    assert len(data.request_ids) == 1800
    with pytest.raises(ValueError, match=r"latency=.*and quality=.* different request pools \(task_seed 0 against 1\)"):
        loading.load_replay_data(quality=seed1, latency=shipped("micro_h200_requests.parquet", tmp_path),
                                 requests=requests1)
    test_split = with_pool("micro_quality_val.parquet", tmp_path, "q_test.parquet", split="test")
    with pytest.raises(ValueError, match=r"split 'test' against 'val'"):
        loading.load_replay_data(quality=test_split)
    # a table that records no pool (made before pools were recorded) still loads
    frame, metadata = read_parquet(loading.profiles_dir() / "micro_quality_val.parquet")
    del metadata["protocol"]["pool"]
    assert loading.load_replay_data(quality=str(write_parquet(frame, tmp_path / "q_nopool.parquet", metadata))).grid


def test_a_table_argument_of_the_wrong_file_says_what_it_holds(tmp_path):
    request_table = shipped("requests_val.parquet", tmp_path)
    with pytest.raises(ValueError, match=r"latency=.*holds a `flexvlm-profile request-table` \(features and token "
                                         r"counts\); a latency table comes from `flexvlm-profile stages or requests`"):
        loading.load_replay_data(latency=request_table)
    sweep = shipped("micro_h200_requests.parquet", tmp_path)
    with pytest.raises(ValueError, match=r"requests=.*holds a `flexvlm-profile requests` sweep \(measured latency\)"):
        loading.load_replay_data(requests=sweep)
    not_a_table = tmp_path / "notes.txt"
    not_a_table.write_text("hello")
    with pytest.raises(ValueError, match=r"quality=.*notes.txt' is not a readable `flexvlm-profile quality` table"):
        gym.make("FlexVLMReplay-v0", quality=str(not_a_table))


def test_a_recording_names_own_tables_by_absolute_path_and_simulate_takes_them(tmp_path, monkeypatch):
    """A recording made from a relative table path replays from any directory; `simulate` reads the same tables and
    refuses a block-mask policy the tables were not recorded with."""
    from flexvlm_env.config import Config
    from flexvlm_env.envs.wrappers import EpisodeRecorder

    shipped("micro_quality_val.parquet", tmp_path)
    monkeypatch.chdir(tmp_path)
    env = EpisodeRecorder(gym.make("FlexVLMReplay-v0", quality="micro_quality_val.parquet"), tmp_path / "rec.parquet")
    assert env.unwrapped.recording_kwargs()["quality"] == str(tmp_path.resolve() / "micro_quality_val.parquet")
    assert env.unwrapped.recording_kwargs()["latency"] == "molmoe-1b-h100"  # shipped names stay names
    request = env.unwrapped.data.request_ids[0]
    own = loading.simulate(request, Config(4, 2, 12), quality="micro_quality_val.parquet")
    assert own == loading.simulate(request, Config(4, 2, 12))
    with pytest.raises(ValueError, match=r"config.mask_policy='prefix': the tables were recorded with "
                                         r"mask_policy='importance'"):
        loading.simulate(request, Config(4, 2, 12, mask_policy="prefix"))


def test_flexvlm_train_learns_on_your_tables(tmp_path):
    """`flexvlm-train --quality PATH --latency PATH`: the run reads them (and says so in args.json); a path that
    does not exist is a usage error before any run directory."""
    quality = str(two_family_quality_table(tmp_path))
    latency = shipped("micro_h200_stages.parquet", tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    runs = tmp_path / "runs"
    cli = [sys.executable, "-m", "trainers.cli", "lut", "--quality", "my_quality", "--latency", latency, "--runs-dir",
           str(runs), "--total-env-steps", "1400", "--eval-every-env-steps", "1400", "--no-wandb"]
    out = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    args = json.loads((run_dir / "args.json").read_text())
    # kept absolute (the command gave the quality table relative to its directory), so --resume works from anywhere
    assert args["quality"] == str(Path(quality).resolve()) and args["latency"] == str(Path(latency).resolve())
    final = json.loads((run_dir / "final.json").read_text())
    assert final["results"]["lut"]["mean"]["quality_retention"] > 0 and "greedy" in final["results"]
    bad = subprocess.run([*cli[:6], "--latency", str(tmp_path / "my_gpu"), "--runs-dir", str(tmp_path / "none")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--latency=" in bad.stderr and "nor an existing path" in bad.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_profile_then_train_on_this_machine(tmp_path):
    """The whole flow on a small grid: `flexvlm-profile quality` and `requests` here (the CPU standing in for your
    GPU), then `flexvlm-train lut` on their shard directories, which replays the 2 x 2 x 2 grid they cover."""
    pool = ["--families", "tally_qa", "doc_qa", "--per-family", "3", "--crops", "1", "12", "--top-k", "1", "8",
            "--active-blocks", "8", "16", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for command in ("quality", "requests"):
        out = subprocess.run([sys.executable, "-m", "flexvlm_env.profiles.cli", command, "--out", str(tmp_path / command),
                              *pool], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    data = loading.load_replay_data(quality=str(tmp_path / "quality"), latency=str(tmp_path / "requests"))
    assert data.grid.shape == (2, 2, 2) and len(data.request_ids) == 6
    assert data.metadata["latency_table"]["device"]["device_type"] == "cpu"
    out = subprocess.run([sys.executable, "-m", "trainers.cli", "lut", "--quality", str(tmp_path / "quality"),
                          "--latency", str(tmp_path / "requests"), "--total-env-steps", "24", "--eval-every-env-steps", "24",
                          "--no-wandb", "--runs-dir", str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    final = json.loads((run_dir / "final.json").read_text())
    assert set(final["results"]) >= {"lut", "greedy", "full"}
