"""Random probe vectors for Hutchinson-type estimators.

A probe z over all P coordinates satisfies E[z] = 0 and E[z zᵀ] = I, so
E[zᵀ A z] = tr A for any square A and E[‖A z‖²] = ‖A‖_F².

* ``"rademacher"``: z_i = ±1 with probability ½ each (minimum variance for trace estimation:
  Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for symmetric A).
* ``"gaussian"``: z_i ~ N(0, 1) (Var(zᵀAz) = 2 ‖A‖_F²).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DISTRIBUTIONS = ("rademacher", "gaussian")


def sample_probes(
    shapes_like: Sequence[torch.Tensor],
    count: int,
    distribution: str,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Draw ``count`` probes shaped like ``shapes_like``: one ``[count, *p.shape]`` tensor each.

    Probes are drawn one after another (all tensors of probe 1, then of probe 2, ...), so the
    k-th probe is the same whatever chunk size a strategy asks for. They are drawn on the
    generator's device (a CPU generator gives the same numbers whatever device the model is
    on) and then moved to each tensor's device and dtype.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    device = generator.device
    drawn: list[list[torch.Tensor]] = [[] for _ in shapes_like]
    for _ in range(count):
        for slot, ref in zip(drawn, shapes_like):
            if distribution == "rademacher":
                z = torch.randint(0, 2, ref.shape, generator=generator, device=device, dtype=torch.int8)
                z = z.to(ref.dtype).mul_(2).sub_(1)
            else:
                z = torch.randn(ref.shape, generator=generator, device=device, dtype=torch.float32)
            slot.append(z)
    return [
        torch.stack(slot).to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        for slot, ref in zip(drawn, shapes_like)
    ]
