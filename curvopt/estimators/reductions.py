"""Per-probe, per-layer reductions of products: dot products ⟨z_l, (Az)_l⟩ and squared norms ‖(Az)_l‖².

Every Hutchinson-type estimator reads its per-layer values from the same products through these:
one BLAS dot per tensor and probe, summed into layers by a one-hot ``[n_tensors, L]`` matrix, on the
products' device (one transfer per estimate, at its end).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.layers import Layer


def layer_index(layers: Sequence[Layer], device: torch.device) -> torch.Tensor:
    """One-hot ``[n_tensors, L]`` matrix summing per-tensor values into per-layer values."""
    owners = [i for i, layer in enumerate(layers) for _ in layer.params]
    index = torch.zeros(len(owners), len(layers), dtype=torch.float64, device=device)
    index[torch.arange(len(owners)), torch.tensor(owners)] = 1.0
    return index


def dots(a: list[torch.Tensor], b: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[k, n_tensors]`` float64 of ⟨a_i[j], b_i[j]⟩ per probe j (⟨a, a⟩ when b is None).

    BLAS dot products: no temporaries, blocked float32 accumulation (an order of magnitude
    faster than an elementwise product followed by a float64 sum).
    """
    k = a[0].shape[0]
    values = torch.empty(k, len(a), dtype=torch.float64, device=a[0].device)
    for i, x in enumerate(a):
        y = x if b is None else b[i]
        for j in range(k):
            xj, yj = x[j].reshape(-1), y[j].reshape(-1)
            values[j, i] = torch.dot(xj, yj)
    return values


def reduce_chunk(
    z: list[torch.Tensor], hz: list[torch.Tensor], gz: list[torch.Tensor] | None, index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-probe, per-layer statistics of one chunk of probes (each ``[k, L]``).

    Products come back in whatever layout the backward kernels chose (conv-weight HVPs are
    transposed on CPU); one ``contiguous()`` per product keeps every dot product copy-free.
    """
    hz = [h.contiguous() for h in hz]
    out = {"trace": dots(z, hz) @ index, "hess_row_sq": dots(hz) @ index}
    if gz is not None:
        gz = [g.contiguous() for g in gz]
        out["gn_trace"] = dots(z, gz) @ index
        out["gn_row_sq"] = dots(gz) @ index
        out["tensor_row_sq"] = dots(torch._foreach_sub(hz, gz)) @ index  # one fused pass, not a tensor per layer
    return out
