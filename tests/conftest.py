"""Shared fixtures: a tiny random-weight model with the MolmoE topology (fast on a CPU)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from flexvlm_env.model.args import ModelArgs, VisionArgs
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.runtime import VLM, assets_dir
from flexvlm_env.model.tokenizer import TextTokenizer

TINY = ModelArgs(
    name="tiny",
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_experts=8,
    expert_hidden=16,
    top_k=2,
    embedding_size=50304,
    additional_vocab_size=0,
    projector_hidden=16,
    max_crops=12,
    max_seq_len=2048,
    vision=VisionArgs(width=24, n_layers=3, n_heads=2, head_dim=12, mlp_dim=48, vit_layers=(-1, -3)),
)


def make_tiny_vlm(seed: int = 0, args: ModelArgs = TINY, **kwargs) -> VLM:
    torch.manual_seed(seed)
    module = MolmoE(args).init_random_(seed)
    tokenizer = TextTokenizer.from_file(assets_dir("molmoe-1b"))
    return VLM(module, tokenizer, random_weights=True, **kwargs)


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`), split the cores between the workers: torch and the scripts
    the tests start (OMP_NUM_THREADS is inherited) would otherwise each run one thread per core,
    two workers of two threads on two cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # The cores this process may run on (a container's affinity), as `-n auto` counts them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


def cpu_threads(preferred: int = 2) -> int:
    """Threads for a CPU model fixture: `preferred`, or fewer where pytest_configure gave this
    process fewer."""
    return min(preferred, torch.get_num_threads())


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test starts from global torch, NumPy and `random` states of its own (from its node id), whatever ran
    before it: under pytest-xdist the tests a worker runs, and so the data an unseeded test draws, change from run
    to run, and a bound that random data rarely cross would then fail CI now and then."""
    import random
    import zlib

    import numpy as np

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session", autouse=True)
def _sb3_logdir(tmp_path_factory):
    """Tests that call SB3's learn() directly get its default log folder under pytest's tmp dir,
    not a new SB3-<time> directory in the system temp folder each time."""
    import os

    previous = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3"))
    yield
    if previous is None:
        del os.environ["SB3_LOGDIR"]
    else:
        os.environ["SB3_LOGDIR"] = previous


@pytest.fixture(scope="session")
def tiny_vlm() -> VLM:
    torch.set_num_threads(cpu_threads())
    return make_tiny_vlm()


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (the drivers are files, not package modules)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
