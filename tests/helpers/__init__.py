"""What the tests share: dense references (:mod:`helpers.dense`), small models (:mod:`helpers.models`), scripted
alarms (:mod:`helpers.alarms`) and a fixed learning-rate policy (:mod:`helpers.policies`).
Imported as ``from helpers import …`` (pytest puts ``tests/`` on the path); fixtures stay in ``conftest.py``."""

from .alarms import alarm_on_estimate
from .dense import DenseCurvature, dense_curvature, gaussian_variance, rademacher_variance, variance_se
from .models import LayerNormGELU, TiedMLP, TinyAttention, bn_cnn, layer_params, mlp
from .policies import FixedScale

__all__ = [
    "DenseCurvature",
    "FixedScale",
    "LayerNormGELU",
    "TiedMLP",
    "TinyAttention",
    "alarm_on_estimate",
    "bn_cnn",
    "dense_curvature",
    "gaussian_variance",
    "layer_params",
    "mlp",
    "rademacher_variance",
    "variance_se",
]
