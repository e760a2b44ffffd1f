"""Data-parallel training: DDP/FSDP wrapping, gradient sync and averaging, global gradient clipping.

One process (plain ``python``) needs none of this: every helper degrades to a no-op or the identity.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from blip2.distributed import get_world_size, is_distributed
from blip2.errors import InputError


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``module``'s trainable parameters.

    ``find_unused_parameters``: a stage may leave heads unused (stage 2 never touches the ITM head);
    buffers are synced once, not before every forward (frozen parts keep theirs, trainable parts have none that change).
    """
    newer_torch = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if newer_torch else {"broadcast_buffers": False}
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        **no_buffer_sync,
    )


def wrap_fsdp(module: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """Shard ``module`` with FSDP2 (``fully_shard``) -> (sharded module, trainable parameters left replicated).

    Each element of every ``nn.ModuleList`` (transformer blocks) is one unit, the rest forms the root unit.
    FSDP2 cannot shard 0-d parameters (BLIP-2's ``temp``): those stay whole on every rank and their gradients must be
    averaged with ``average_gradients``. Trainable parameters are first broadcast from rank 0, as DDP does.
    Tried on CPU (gloo) in this project's tests only; on GPUs prefer bf16 (fp16's GradScaler is untried with FSDP).
    """
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise InputError("fsdp: true needs several processes: launch with `torchrun --nproc_per_node=N ...`, "
                           "or set fsdp: false for a single process")
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                dist.broadcast(param, src=0)
    scalars = {p for p in module.parameters() if p.ndim == 0}
    for block_list in [m for m in module.modules() if isinstance(m, nn.ModuleList)]:
        for block in block_list:
            fully_shard(block, ignored_params=scalars)
    return fully_shard(module, ignored_params=scalars), [p for p in scalars if p.requires_grad]


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (a missing gradient counts as zero)."""
    if not is_distributed():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= get_world_size()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Works for plain gradients and for a mix of FSDP2-sharded (DTensor) and replicated ones.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded_norm = float(full_tensor(torch.nn.utils.get_total_norm(sharded)))
    total = math.hypot(sharded_norm, float(torch.nn.utils.get_total_norm(plain)) if plain else 0.0)
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for grad in grads:
            grad.mul_(scale)
    return total


@contextmanager
def gradient_sync(engine: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward passes synchronise gradients across ranks only when ``enabled`` (the last micro-batch)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(engine, DistributedDataParallel):
        with nullcontext() if enabled else engine.no_sync():
            yield
    elif isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def full_tensor(tensor: Tensor) -> Tensor:
    """A sharded FSDP2 tensor gathered whole (a collective: every rank must call it); other tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` (a whole tensor) laid out like ``reference``: sharded the same way when ``reference`` is an FSDP2
    DTensor of the same global shape, else unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and value.shape == reference.shape:
        return distribute_tensor(value.to(reference.device), reference.device_mesh, reference.placements)
    return value
