"""``curvopt train --fsdp``: the model sharded by FSDP2 (``fully_shard``) under torchrun, and its checkpoints.

* **Sharding.** The repeated blocks become one FSDP unit each (the elements of the model's
  ``Sequential``/``ModuleList`` children: a ResNet stage's blocks, a ViT's blocks), then the root, which
  holds the rest (stem or patch embedding, norms, head). The stem stays in the root unit because FSDP2
  hooks a unit's *output* for its pre-backward all-gather, and a patch embedding returns a view
  (``flatten(2).transpose(1, 2)``) on which FSDP2 warns at every forward that an in-place op would drop
  that hook. Parameters become DTensors sharded over the ranks; curvature is estimated by finite
  differences on each rank's shards (:mod:`curvopt.engine.sharding`), with one all-reduce per estimate.
* **Gradient accumulation.** Inside a window, ``set_requires_gradient_sync(False)`` (FSDP2's ``no_sync``).
* **Checkpoints** hold *full* (unsharded) model and optimizer state dicts, gathered with
  ``torch.distributed.checkpoint.state_dict`` on every rank and written by rank 0, so a checkpoint looks
  like a DDP one and resumes on any number of ranks; on resume every rank loads the file and keeps its
  shards.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def shard_model(model: nn.Module) -> nn.Module:
    """Apply ``fully_shard`` to the model's repeated blocks (see the module docstring) and the root."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for block in child.children():
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    return fully_shard(model)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: nn.Module, inner_optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model state dict, optimizer state dict)``, unsharded, on rank 0 (empty elsewhere). A collective:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, inner_optimizer, options=options),
    )


def load_full_state(model: nn.Module, inner_optimizer: Any, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (every rank holds them, read from the checkpoint) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, inner_optimizer, optimizer_state, options=_options())
