"""Data parallelism for the trainers, in four collectives (no DistributedDataParallel wrapper).

Under torchrun each process trains a replica on its shard of the global batch
(`TrainBatchSpec.shard_index/shard_count`). Every process draws the same knobs, so all replicas
run the same block plan and the set of parameters with gradients is the same everywhere: one flat
all-reduce per step averages them, and identical AdamW steps keep the replicas bit-identical,
which `check_replicas` verifies. DDP would need `find_unused_parameters` for the skipped blocks
of elastic training; a plain averaged all-reduce needs nothing.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def resolve_device(device: str) -> torch.device:
    """"cuda", "cpu", ... or "auto" (CUDA when available) -> a torch device."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def setup_processes(device: str, global_batch_size: int) -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process per GPU under torchrun (gloo between CPU processes),
    else (0, 1, `device`). `device` is "cuda", "cpu" or "auto"."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolved
    if global_batch_size % world:
        raise ValueError(f"batch_size={global_batch_size} must be a multiple of the {world} processes")
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return dist.get_rank(), world, resolved


def end_processes(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Replace each gradient by its mean over the processes (one all-reduce of all of them)."""
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def all_reduce_mean_(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """In place: the mean of `tensor` over the processes; returns it."""
    if world > 1:
        dist.all_reduce(tensor)
        tensor /= world
    return tensor


def broadcast_from_rank0_(tensors: Iterable[torch.Tensor], world: int) -> None:
    """In place: every process gets rank 0's values."""
    if world > 1:
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def check_replicas(module: torch.nn.Module, world: int) -> None:
    """Raise if the processes' weights differ (they must stay bit-identical)."""
    if world == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    values = [float(c) for c in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight checksums per rank {values}")
