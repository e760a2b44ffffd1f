"""Process-group helpers: join/leave the group torchrun describes, this process's rank and world size, small
collectives. Shared by the losses (ITC's gather), the data (shard splitting) and the trainer.

One process (plain ``python``) needs none of this: every helper degrades to a no-op or the identity.
"""

from __future__ import annotations

import atexit
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Join the process group torchrun describes (when WORLD_SIZE > 1) -> (rank, world, local_rank, device).

    nccl on GPUs (one per local rank), gloo on CPU. A group it creates is left at interpreter exit, so ranks stay
    known after training (e.g. for rank 0 to save the final model). Calling it again, or after the caller initialised
    a group itself, reuses the existing group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        atexit.register(teardown_distributed)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return get_rank(), get_world_size(), local_rank, device


def teardown_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and world size: the process group's, else torchrun's environment (a data loader worker
    may run before the group exists), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone writes checkpoints and logs."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce ("sum", "min" or "max") across ranks; the identity for one process."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_json(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (sent as UTF-8 bytes, never pickled)."""
    if not is_distributed():
        return [obj]
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)  # [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(s.item())].cpu().tolist()).decode()) for g, s in zip(gathered, sizes)]
