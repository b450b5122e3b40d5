"""curvopt: per-layer curvature of the training loss, measured while you train.

Data flow, top to bottom: ``layers`` (which tensors form a block) -> ``context`` and
``products`` (Hessian/GGN-vector products) -> ``estimate`` (Hutchinson estimators) ->
``variance`` (probe budget), ``monitor`` (CUSUM alarms), ``scaling`` (layer-wise LR) ->
``optimizer`` (the wrapper) -> ``loggers`` / ``wandb_logger`` and ``plots`` / ``report`` (display) ->
``data``, ``recipes``, ``train``, ``demo``, ``cli`` (the programs).
"""

from .blocks import BlockNorms, activation_block_norms, block_norms
from .estimate import CurvatureEstimate, NonFiniteCurvatureError, estimate_curvature
from .layers import ROOT_LAYER, Layer, group_parameters, unwrap_model
from .loggers import CallbackLogger, JsonlLogger, read_jsonl
from .monitor import Alarm, CusumMonitor
from .optimizer import CurvatureAwareOptimizer
from .products import STRATEGIES, CurvatureInputError
from .scaling import TraceScaling
from .spectra import Spectrum, layer_spectrum
from .variance import ProbeBudgetTracker
from .wandb_logger import WandbLogger

__version__ = "0.1.0"

__all__ = [
    "ROOT_LAYER",
    "STRATEGIES",
    "Alarm",
    "BlockNorms",
    "CallbackLogger",
    "CurvatureAwareOptimizer",
    "CurvatureEstimate",
    "CurvatureInputError",
    "CusumMonitor",
    "JsonlLogger",
    "Layer",
    "NonFiniteCurvatureError",
    "ProbeBudgetTracker",
    "Spectrum",
    "TraceScaling",
    "WandbLogger",
    "__version__",
    "activation_block_norms",
    "block_norms",
    "estimate_curvature",
    "group_parameters",
    "layer_spectrum",
    "read_jsonl",
    "unwrap_model",
]
