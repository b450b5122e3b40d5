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
  (fp32 for a normal model) even if training runs under autocast. A forward that a framework wrapped in
  autocast itself (accelerate, hence the Hugging Face ``Trainer`` with ``bf16=True``/``fp16=True``, replaces
  ``model.forward`` by an autocast-wrapped one and keeps the original as ``_original_forward``) would
  switch autocast back on inside the call, so such a module's original forward is put back while probing.
  ``curvature_dtype`` opts into cheaper products: ``"bfloat16"`` runs the forward and both backward
  passes under bf16 autocast (the probes, the products' accumulation and every reduction stay fp32);
  ``"tf32"`` lets CUDA matmuls and convolutions use TensorFloat-32; ``"float32"`` forbids TF32 while probing (strict
  IEEE fp32 whatever the global flags say). ``None`` (default) keeps the global backend flags.

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


CURVATURE_DTYPES = ("float32", "tf32", "bfloat16")
_active_sessions = 0


def is_probing() -> bool:
    """Whether a probing session is open (its forwards are curvopt's, not a training step's): hooks that record
    training batches (:mod:`curvopt.integrations`) ignore forwards made while this is true."""
    return _active_sessions > 0


def resolve_curvature_dtype(value: str | torch.dtype | None) -> str | None:
    """``None`` or one of ``CURVATURE_DTYPES`` for a user's ``curvature_dtype`` (a name or a torch dtype).

    >>> resolve_curvature_dtype(torch.bfloat16)
    'bfloat16'
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(value, str(value))
    name = str(value).removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(name, name)
    if name in ("float16", "half", "fp16"):
        raise ValueError(
            "curvature_dtype float16 is not supported: second derivatives overflow its range; use 'bfloat16'"
        )
    if name not in CURVATURE_DTYPES:
        raise ValueError(f"unknown curvature_dtype {value!r}; expected None or one of {CURVATURE_DTYPES}")
    return name


@contextlib.contextmanager
def _cuda_fp32_precision(mode: str) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions in ``mode`` (``"tf32"`` or ``"ieee"``), restored on exit."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):  # pragma: no cover - torch < 2.9: legacy flags
        saved_legacy = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy
        return
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def _precision_contexts(
    curvature_dtype: str | None, device_type: str, cuda: bool
) -> list[contextlib.AbstractContextManager]:
    """The autocast / TF32 contexts of ``curvature_dtype`` (see the module docstring)."""
    contexts: list[contextlib.AbstractContextManager] = [torch.autocast("cpu", enabled=False)]
    if cuda:
        contexts.append(torch.autocast("cuda", enabled=False))
    if curvature_dtype == "bfloat16":
        contexts.append(torch.autocast(device_type, dtype=torch.bfloat16))
    elif cuda and curvature_dtype in ("tf32", "float32"):
        contexts.append(_cuda_fp32_precision("tf32" if curvature_dtype == "tf32" else "ieee"))
    return contexts


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
def probing_context(
    model: nn.Module, *, mask_seed: int, curvature_dtype: str | None = None
) -> Iterator[Callable[[], None]]:
    """Context in which ``model``'s training loss is probed; yields an RNG rewinder.

    Args:
        model: the (unwrapped) model.
        mask_seed: seed of the private RNG stream that draws dropout masks for this estimate.
        curvature_dtype: ``None`` or one of ``CURVATURE_DTYPES`` (see the module docstring).

    Yields:
        A callable that rewinds the private RNG stream; call it before each forward pass.
    """
    modules = list(model.modules())
    saved_modes = [m.training for m in modules]
    saved_tracking = [
        (m, m.track_running_stats) for m in modules if isinstance(getattr(m, "track_running_stats", None), bool)
    ]
    saved_fused = [(m, m.fused_attn) for m in modules if isinstance(getattr(m, "fused_attn", None), bool)]
    autocast_forwards = [
        (m, m.__dict__["forward"]) for m in modules if "forward" in m.__dict__ and "_original_forward" in m.__dict__
    ]
    sync_bn = [m for m in modules if isinstance(m, nn.SyncBatchNorm)]
    cuda_devices = _cuda_devices(model)
    global _active_sessions
    _active_sessions += 1
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
        for module, _ in autocast_forwards:
            module.forward = module.__dict__["_original_forward"]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.enable_grad())
            device_type = next((p.device.type for p in model.parameters()), "cpu")
            precision = resolve_curvature_dtype(curvature_dtype)
            for context in _precision_contexts(precision, device_type, bool(cuda_devices)):
                stack.enter_context(context)
            if sdpa_kernel is not None:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            torch.random.default_generator.manual_seed(mask_seed)
            for device in cuda_devices:
                torch.cuda.default_generators[device].manual_seed(mask_seed)
            yield RngRewinder(cuda_devices)
    finally:
        _active_sessions -= 1
        for module, mode in zip(modules, saved_modes):
            module.training = mode
        for module, flag in saved_tracking:
            module.track_running_stats = flag
        for module, flag in saved_fused:
            module.fused_attn = flag
        for module, wrapped in autocast_forwards:
            module.forward = wrapped
        for module in sync_bn:
            module.__class__ = nn.SyncBatchNorm
