"""torchrun support: process group set-up, DDP or FSDP2 wrapping, full or sharded state dicts for checkpoints."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world, local)


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Run the block on rank 0, then on the first rank of every other node, then on the rest: for work
    that fills a cache (a corpus prepared or re-tokenized on first use, a .gguf imported), which two
    processes must not write at once. A cache on a file system the nodes share is filled by rank 0 and
    found done by everyone after; a cache on node-local disk (the default ~/.cache on most clusters) is
    filled once per node, by that node's first rank. No setting says which: both orders are safe."""
    if not info.enabled:
        yield
        return
    if info.is_main:
        yield
        dist.barrier()
        dist.barrier()
    elif info.local_rank == 0:
        dist.barrier()
        yield
        dist.barrier()
    else:
        dist.barrier()
        dist.barrier()
        yield


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, parallel: str, device: str) -> nn.Module:
    """``ddp`` replicates the model; ``fsdp`` shards parameters, gradients and optimizer state per layer."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if device == "cuda" else None)
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5
            from torch.distributed._composable.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel: unknown strategy {parallel!r}; expected ddp or fsdp")


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (complete on rank 0), for any wrapping."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state as each rank holds it (DTensor shards under FSDP, the replica under DDP),
    keyed by parameter names, for torch.distributed.checkpoint: no rank gathers the whole of it. On a
    fresh optimizer the state is created first (a zero-lr step), so a checkpoint can be loaded into it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt) -> None:
    """Load a sharded checkpoint into the wrapped model and its optimizer, resharding as needed: it may
    have been written by any number of ranks, with FSDP, DDP or one process."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from ..io.checkpoint import load_sharded

    state = sharded_state(model, optimizer)
    load_sharded(ckpt, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
