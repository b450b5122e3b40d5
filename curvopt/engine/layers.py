"""Layers: which parameter tensors form one curvature block, and under which name.

A *layer* is the module that owns parameter tensors directly (the weight and bias of one
``Conv2d``/``Linear``/``BatchNorm`` together), named by its qualified module name
(``layer1.0.conv1``; ``0``, ``2`` inside an ``nn.Sequential``). Parameters owned by the
root module itself (a ViT's ``cls_token``/``pos_embed``) form the layer ``ROOT_LAYER``.

Every *unique* trainable tensor belongs to exactly one layer. A tied tensor (a shared
embedding/output weight, a module reused twice) is counted once, under its first owner in
``named_modules()`` order, so its block is the Hessian with respect to the shared tensor
itself, never the sum of per-use blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .sharding import is_fsdp1, module_kind

ROOT_LAYER = "(root)"

LayerSpec = Mapping[str, Sequence[str | nn.Parameter | nn.Module]]
"""A custom grouping: layer name -> parameter names, parameters, module names or modules."""


@dataclass(frozen=True)
class Layer:
    """One curvature block: a name and the unique parameter tensors it holds."""

    name: str
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    kind: str = ""  # the owning module's class (``Conv2d``); empty for a custom grouping

    @property
    def label(self) -> str:
        """What people recognise: ``layer1.0.conv1 · Conv2d``, ``0 · Linear`` (the name alone without a kind)."""
        return f"{self.name} · {self.kind}" if self.kind else self.name

    @property
    def numel(self) -> int:
        """Number of scalar coordinates d_l of the block."""
        return sum(p.numel() for p in self.params)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module that actually computes: strip DDP/DataParallel and torch.compile.

    ``DistributedDataParallel`` and ``DataParallel`` keep the real module in ``.module``;
    ``torch.compile`` keeps it in ``._orig_mod``. Probing the inner module avoids DDP's
    reducer (which ``autograd.grad`` would not fire anyway) and compiled graphs that do not
    support double backward. An FSDP2 model (``fully_shard``) is its own module and is probed as it
    is, with sharded parameters (finite differences, :mod:`curvopt.engine.sharding`); FSDP1
    (``FullyShardedDataParallel``) hides its parameters in flat buffers and is rejected.
    """
    seen = 0
    while True:
        if is_fsdp1(model):
            raise TypeError(
                "curvopt cannot probe a FullyShardedDataParallel (FSDP1) model: it flattens the parameters into "
                "buffers the layers cannot be read from. Shard with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard), which curvopt probes by finite differences "
                "(strategy='auto' or 'finite-difference')."
            )
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            inner = model._orig_mod
        if inner is None:
            return model
        model = inner
        seen += 1
        if seen > 16:  # pragma: no cover - defensive against cyclic wrappers
            raise TypeError("model wrappers nest more than 16 levels deep")


def _module_layers(model: nn.Module) -> list[Layer]:
    """Default grouping: one layer per module that directly owns trainable tensors."""
    owner: dict[int, tuple[str, str]] = {}  # id(param) -> (layer name, qualified param name)
    order: list[str] = []
    kinds: dict[str, str] = {}
    members: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for module_name, module in model.named_modules():
        for local_name, param in module._parameters.items():
            if param is None or not param.requires_grad or id(param) in owner:
                continue
            layer_name = module_name or ROOT_LAYER
            qualified = f"{module_name}.{local_name}" if module_name else local_name
            owner[id(param)] = (layer_name, qualified)
            if layer_name not in members:
                members[layer_name] = []
                order.append(layer_name)
                kinds[layer_name] = module_kind(module)
            members[layer_name].append((qualified, param))
    return [
        Layer(name, tuple(n for n, _ in members[name]), tuple(p for _, p in members[name]), kinds[name])
        for name in order
    ]


def _custom_layers(model: nn.Module, spec: LayerSpec) -> list[Layer]:
    """User grouping; validates that every entry resolves and no tensor is listed twice."""
    param_by_name = dict(model.named_parameters())
    name_by_id = {id(p): n for n, p in param_by_name.items()}
    modules = dict(model.named_modules())
    taken: dict[int, str] = {}
    layers: list[Layer] = []
    for layer_name, entries in spec.items():
        if isinstance(entries, (str, nn.Module, nn.Parameter)):
            entries = [entries]
        picked: list[tuple[str, nn.Parameter]] = []
        for entry in entries:
            if isinstance(entry, nn.Parameter):
                if id(entry) not in name_by_id:
                    raise ValueError(f"layer {layer_name!r}: a parameter is not part of the model")
                found = [(name_by_id[id(entry)], entry)]
            elif isinstance(entry, nn.Module):
                found = [(name_by_id[id(p)], p) for p in entry.parameters() if id(p) in name_by_id]
            elif isinstance(entry, str) and entry in param_by_name:
                found = [(entry, param_by_name[entry])]
            elif isinstance(entry, str) and entry in modules:
                found = [(name_by_id[id(p)], p) for p in modules[entry].parameters()]
            else:
                raise ValueError(f"layer {layer_name!r}: {entry!r} is neither a parameter nor a module of the model")
            for qualified, param in found:
                if not param.requires_grad:
                    continue
                if id(param) in taken:
                    if taken[id(param)] == layer_name:
                        continue
                    raise ValueError(
                        f"parameter {qualified!r} is listed in layers {taken[id(param)]!r} and "
                        f"{layer_name!r}; each tensor must belong to exactly one layer"
                    )
                taken[id(param)] = layer_name
                picked.append((qualified, param))
        if not picked:
            raise ValueError(f"layer {layer_name!r} holds no trainable parameter")
        layers.append(Layer(layer_name, tuple(n for n, _ in picked), tuple(p for _, p in picked)))
    return layers


def group_parameters(model: nn.Module, layers: LayerSpec | None = None) -> list[Layer]:
    """Split the trainable parameters of ``model`` into curvature blocks.

    Args:
        model: the model (wrappers are not stripped here; see :func:`unwrap_model`).
        layers: ``None`` for one layer per owning module (the parameters it owns directly), or a mapping
            ``name -> [parameter names | parameters | module names | modules]``. Tensors not
            listed are held constant: the estimate covers the listed blocks only.

    Raises:
        ValueError: no trainable parameter, an unknown name, or a tensor in two layers.
    """
    result = _module_layers(model) if layers is None else _custom_layers(model, layers)
    if not result:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (all requires_grad=False?): "
            "there is no curvature to estimate"
        )
    return result


def flat_params(layers: Sequence[Layer]) -> list[torch.Tensor]:
    """All tensors of ``layers`` in layer order (the order probes and products use)."""
    return [p for layer in layers for p in layer.params]


def resolve_blocks(model: nn.Module, layers: LayerSpec | Sequence[Layer] | None) -> tuple[nn.Module, list[Layer]]:
    """The unwrapped model and its blocks: prebuilt :class:`Layer` objects as given, else
    :func:`group_parameters` of ``layers`` (``None``: one block per owning module)."""
    core = unwrap_model(model)
    if layers is not None and len(layers) and all(isinstance(x, Layer) for x in layers):
        return core, list(layers)  # type: ignore[arg-type]
    return core, group_parameters(core, layers)  # type: ignore[arg-type]
