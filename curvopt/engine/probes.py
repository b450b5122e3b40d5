"""Random probe vectors for Hutchinson-type estimators.

A probe z over all P coordinates satisfies E[z] = 0 and E[z zᵀ] = I, so
E[zᵀ A z] = tr A for any square A and E[‖A z‖²] = ‖A‖_F².

* ``"rademacher"``: z_i = ±1 with probability ½ each (minimum variance for trace estimation:
  Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for symmetric A).
* ``"gaussian"``: z_i ~ N(0, 1) (Var(zᵀAz) = 2 ‖A‖_F²).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

DISTRIBUTIONS = ("rademacher", "gaussian")


def probe_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: probes are drawn where the parameters live (no host
    round trip), reproducibly on a given device type (CPU and CUDA streams differ)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def derive_seed(generator: torch.Generator) -> int:
    """A fresh 62-bit seed from ``generator``, advancing it, without a device synchronisation.

    A CPU generator draws it. For an accelerator generator, reading a drawn number would stall the
    device, so the seed is a hash of the generator's host-side state (its seed and offset), and the
    generator is then advanced by a device-side draw: the next call gives another seed.
    """
    if generator.device.type == "cpu":
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    torch.empty(1, device=generator.device).uniform_(generator=generator)
    return int.from_bytes(digest, "little") % 2**62


_SIGN_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 8]``: row b holds the signs 2·bit_k(b) − 1 of byte b, bit 0 first."""
    table = _SIGN_TABLES.get((device, dtype))
    if table is None:
        bits = (torch.arange(256, dtype=torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[(device, dtype)] = (2 * bits - 1).to(device=device, dtype=dtype)
    return table


def _fill_rademacher(out: torch.Tensor, generator: torch.Generator) -> None:
    """Fill a flat contiguous tensor with ±1: 64 signs per random int64 word, coordinate 8·j + k taking bit k
    of byte j, unpacked eight at a time through a 256-row sign table (one gather per byte)."""
    n = out.numel()
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 63) // 64,), generator=generator, device=out.device, dtype=torch.int64
    )
    data = words.view(torch.uint8)
    table = _sign_table(out.device, out.dtype)
    full = n // 8
    torch.index_select(table, 0, data[:full].long(), out=out[: full * 8].view(full, 8))
    if n > full * 8:  # the last few coordinates: one more byte (indexed on the device, no host read)
        out[full * 8 :] = torch.index_select(table, 0, data[full : full + 1].long())[0, : n - full * 8]


def sample_probes(
    shapes_like: Sequence[torch.Tensor],
    count: int,
    distribution: str,
    generator: torch.Generator,
    buffer: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Draw ``count`` probes shaped like ``shapes_like``: one ``[count, *p.shape]`` tensor each.

    Each probe is drawn as one flat vector over all P coordinates (probe 1, then probe 2, ...),
    so the k-th probe is the same whatever chunk size a strategy asks for; the per-tensor
    pieces are views into it. Probes are drawn in float32 on the generator's device (a CPU
    generator gives the same numbers whatever device the model is on), then moved to each
    tensor's device and dtype. ``buffer`` (float32, at least ``count * P`` elements, on the
    generator's device) is reused instead of a fresh allocation: the previous probes drawn into
    it must no longer be needed.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    sizes = [ref.numel() for ref in shapes_like]
    total = sum(sizes)
    if buffer is not None and buffer.numel() >= count * total and buffer.device == generator.device:
        flat = buffer.reshape(-1)[: count * total].view(count, total)
    else:
        flat = torch.empty(count, total, dtype=torch.float32, device=generator.device)
    for row in flat:
        if distribution == "rademacher":
            _fill_rademacher(row, generator)
        else:
            torch.randn(row.shape, generator=generator, device=generator.device, out=row)
    pieces = torch.split(flat, sizes, dim=1)
    return [
        piece.reshape(count, *ref.shape).to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        for piece, ref in zip(pieces, shapes_like)
    ]
