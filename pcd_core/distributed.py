"""Data-parallel plumbing: process group setup under torchrun, and the few collectives the
loop needs. A single-process run goes through the same functions, which then do nothing,
so ``train.py`` has no ``if distributed`` branches beyond choosing the sampler.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun (``torch.distributed.run``) sets these for every process it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device: str | torch.device | None = None) -> DistInfo:
    """Pick the device and, under torchrun with WORLD_SIZE > 1, join the process group
    (NCCL on CUDA, Gloo on CPU). Reads the torchrun environment, nothing else."""
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return DistInfo(rank, world, local, dev)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistInfo(0, 1, 0, torch.device(device))


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision, on every rank (e.g. ``should_stop``, so all stop together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_tensors(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (BN buffers, matching state)."""
    if not info.distributed:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """All-reduce-mean the gradients of parameters DDP does not own (the method's adapters)."""
    if not info.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of scalar logs across ranks (so rank 0 reports the global loss, not its own)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over the module's state (names and bytes): equal fingerprints, equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_fingerprints(module: nn.Module, info: DistInfo) -> list[str]:
    """Every rank's fingerprint of ``module`` (identical after a correct DDP run)."""
    fp = state_fingerprint(module)
    if not info.distributed:
        return [fp]
    out: list[str] = [""] * info.world_size
    dist.all_gather_object(out, fp)
    return out


def wrap_ddp(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (optionally converting BN to SyncBatchNorm)."""
    if not info.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
