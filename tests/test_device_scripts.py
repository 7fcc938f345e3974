"""The device drivers (scripts/*.sh) parse, and refuse an unknown step before touching a GPU.

They run only on the lent GPU machine, where a syntax error costs a machine start and minutes of
device time; here they are checked with `bash -n` and run with a bad step."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
DRIVERS = sorted(SCRIPTS.glob("*.sh"))


def test_there_are_device_drivers():
    assert {p.name for p in DRIVERS} >= {"train_micro_gpu.sh", "profile_gpu.sh", "reading_round_gpu.sh", "lora_gpu.sh"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", DRIVERS, ids=lambda p: p.name)
def test_driver_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", ["train_micro_gpu.sh", "profile_gpu.sh"])
def test_step_driver_refuses_an_unknown_step(name, tmp_path):
    result = subprocess.run(["bash", str(SCRIPTS / name), "nope"], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "OUT_DIR": str(tmp_path / "out"), "RUN": str(tmp_path / "run")})
    assert result.returncode == 2 and "unknown step nope" in result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("step", ["stages", "quality", "requests"])
def test_profile_driver_passes_weights_to_every_micro_step(step, tmp_path):
    # Stand-ins for the GPU machine's nvidia-smi (one H200) and python3 (records its arguments).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: NVIDIA H200 (UUID: x)'\necho 'NVIDIA H200'\n")
    (bin_dir / "python3").write_text(f"#!/bin/bash\necho \"$*\" >> {tmp_path / 'calls.txt'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PRESET": "micro", "WEIGHTS": "/ckpt/micro224.safetensors"}
    result = subprocess.run(["bash", str(SCRIPTS / "profile_gpu.sh"), step], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls and all("--preset micro --weights /ckpt/micro224.safetensors" in call for call in calls), calls
