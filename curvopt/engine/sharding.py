"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors, their local shards, sums.

Under FSDP2 every parameter is a ``DTensor`` whose ``to_local()`` is this rank's shard (a view of the
storage FSDP all-gathers from), and the gradient a ``backward()`` leaves in ``.grad`` is the
reduce-scattered shard of the global-batch gradient. A full-size direction (a probe drawn identically on
every rank) becomes this rank's shard by :func:`localize` without communication, and a sum over all
coordinates of a sharded quantity is the all-reduced sum of the per-rank partial sums (:func:`all_reduce_sum`).

FSDP1 (``FullyShardedDataParallel``) flattens parameters into one buffer per unit and hides the
original tensors: it is refused with a message naming FSDP2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch or no distributed build
    DTensor = None
    distribute_tensor = None


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (an FSDP2-sharded model)."""
    return any(is_dtensor(p) for p in params)


def is_fsdp1(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def is_fsdp2(model: nn.Module) -> bool:
    """``fully_shard`` makes the module an instance of ``FSDPModule`` (a dynamic subclass ``FSDP<Name>``)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(model).__mro__)


def module_kind(module: nn.Module) -> str:
    """The module's class name as the user wrote it: FSDP2's dynamic ``FSDPLinear`` is a ``Linear``."""
    cls = type(module)
    if is_fsdp2(module):
        cls = next((c for c in cls.__mro__[1:] if c.__name__ != "FSDPModule" and issubclass(c, nn.Module)), cls)
    return cls.__name__


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the parameter); other tensors as they are."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def localize(directions: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[k, *global shape]`` directions (the same on every rank) → ``[k, *local shape]`` shards of ``params``.

    Each rank keeps the slice its parameter shard covers (``distribute_tensor`` with ``src_data_rank=None``:
    every rank shards its own copy, no communication). Unsharded parameters keep the whole direction.
    """
    out = []
    for v, p in zip(directions, params):
        if not is_dtensor(p):
            out.append(v)
            continue
        rows = [
            distribute_tensor(v[j], p.device_mesh, p.placements, src_data_rank=None).to_local()
            for j in range(v.shape[0])
        ]
        out.append(torch.stack(rows))
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks (in place; returned for chaining)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
