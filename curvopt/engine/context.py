"""Put a model into the state in which its training loss is probed, and restore it exactly.

The function whose curvature is estimated is the *training* loss as a training step sees it:

* **Modes.** A model in ``train()`` mode is probed as it is (modules the user froze in eval
  mode stay in eval mode). A model in ``eval()`` mode is switched to ``train()`` for the
  estimate. Every module's ``training`` flag is restored afterwards.
* **Normalisation statistics.** Norm layers in training mode use batch statistics. Their
  ``track_running_stats`` flag is switched off while probing, so the forward uses batch
  statistics (the same function as a train-mode step) but never updates ``running_mean``,
  ``running_var`` or ``num_batches_tracked``. (A train-mode forward with tracking on would
  update them once per forward, and torch.func transforms reject the in-place update.)
  ``SyncBatchNorm`` behaves as a local BatchNorm while probing (each rank's curvature batch uses
  its own statistics): its cross-rank collective has no double backward, and each rank probes
  its own batch anyway (:mod:`curvopt.estimators.distributed`).
* **Dropout / DropPath.** Active, as in training, with *one* mask per estimate: the RNG is
  forked, seeded once, and rewound to the same state before every forward, so all K probes
  (and the GGN products) see the same mask. The caller's CPU and CUDA RNG streams are left
  exactly as they were.
* **Attention.** ``scaled_dot_product_attention`` is pinned to the math backend (fused
  kernels support neither forward-mode AD nor double backward) and timm attention modules
  get ``fused_attn = False`` while probing.
* **Precision.** Autocast is disabled inside: products are computed in the parameters' dtype
  (fp32 for a normal model) even if training runs under autocast.

Everything is restored in a ``finally`` block, so an exception inside leaves no trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    SDPBackend = None
    sdpa_kernel = None


def _cuda_devices(model: nn.Module) -> list[int]:
    devices = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    return sorted(devices)


class RngRewinder:
    """Rewinds the (forked) global RNG to one saved state, so every forward draws one mask."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self._cuda_devices = cuda_devices
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = [torch.cuda.get_rng_state(d) for d in cuda_devices]

    def __call__(self) -> None:
        torch.set_rng_state(self._cpu_state)
        for device, state in zip(self._cuda_devices, self._cuda_states):
            torch.cuda.set_rng_state(state, device)


class _LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A ``SyncBatchNorm`` while probing: the same parameters and buffers, local batch statistics."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


@contextlib.contextmanager
def probing_context(model: nn.Module, *, mask_seed: int) -> Iterator[Callable[[], None]]:
    """Context in which ``model``'s training loss is probed; yields an RNG rewinder.

    Args:
        model: the (unwrapped) model.
        mask_seed: seed of the private RNG stream that draws dropout masks for this estimate.

    Yields:
        A callable that rewinds the private RNG stream; call it before each forward pass.
    """
    modules = list(model.modules())
    saved_modes = [m.training for m in modules]
    saved_tracking = [
        (m, m.track_running_stats) for m in modules if isinstance(getattr(m, "track_running_stats", None), bool)
    ]
    saved_fused = [(m, m.fused_attn) for m in modules if isinstance(getattr(m, "fused_attn", None), bool)]
    sync_bn = [m for m in modules if isinstance(m, nn.SyncBatchNorm)]
    cuda_devices = _cuda_devices(model)
    try:
        for module in sync_bn:  # per-rank batch statistics; SyncBN's collective has no double backward
            module.__class__ = _LocalBatchNorm
        if not model.training:
            model.train()
        for module, _ in saved_tracking:
            if module.training:
                module.track_running_stats = False
        for module, _ in saved_fused:
            module.fused_attn = False
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if cuda_devices:
                stack.enter_context(torch.autocast("cuda", enabled=False))
            if sdpa_kernel is not None:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            torch.random.default_generator.manual_seed(mask_seed)
            for device in cuda_devices:
                torch.cuda.default_generators[device].manual_seed(mask_seed)
            yield RngRewinder(cuda_devices)
    finally:
        for module, mode in zip(modules, saved_modes):
            module.training = mode
        for module, flag in saved_tracking:
            module.track_running_stats = flag
        for module, flag in saved_fused:
            module.fused_attn = flag
        for module in sync_bn:
            module.__class__ = nn.SyncBatchNorm
