"""curvopt: per-layer curvature of the training loss, measured while you train.

The package reads top to bottom, each subpackage importing only from those above it:

* :mod:`curvopt.engine` — layers, the probing context, probes, Hessian/GGN-vector products;
* :mod:`curvopt.estimators` — per-layer traces and GN-Gap, inter-layer block norms, spectra,
  the probe budget, the distributed reduction;
* :mod:`curvopt.control` — the CUSUM monitor, LR-scaling policies, the optimizer wrapper;
* :mod:`curvopt.reporting` — JSONL/callback loggers, W&B, plots, reports, tables;
* :mod:`curvopt.integrations` — callbacks for the Hugging Face Trainer and Lightning (imported on demand);
* :mod:`curvopt.programs` — the ``curvopt`` command: demo, ``train``, recipes, datasets, models.

The names below are the public API.
"""

from .control.edge import EdgeScaling
from .control.monitor import Alarm, CusumMonitor
from .control.optimizer import CurvatureAwareOptimizer
from .control.rollback import RollbackOnAlarm
from .control.scaling import LR_SCALING_POLICIES, LRPolicy, TraceScaling
from .control.settings import CurvatureConfig, MonitorConfig
from .engine.batch import CurvatureInputError
from .engine.finite_difference import FiniteDifferenceWarning
from .engine.layers import ROOT_LAYER, Layer, group_parameters, unwrap_model
from .engine.losses import CausalLMLoss, causal_lm_loss
from .engine.operator import CurvatureOperator, curvature_operator
from .engine.products import CurvatureStrategyError, DoubleBackwardError
from .engine.strategies import STRATEGIES
from .estimators.blocks import activation_block_norms, block_norms
from .estimators.budget import ProbeBudgetTracker
from .estimators.result import BlockNorms, CurvatureEstimate, LayerEstimate, NonFiniteCurvatureError, Spectrum
from .estimators.spectra import layer_spectrum
from .estimators.trace import estimate_curvature
from .reporting.loggers import CallbackLogger, JsonlLogger, read_jsonl
from .reporting.wandb_logger import WandbLogger

__version__ = "0.1.0"

__all__ = [
    "LR_SCALING_POLICIES",
    "ROOT_LAYER",
    "STRATEGIES",
    "Alarm",
    "BlockNorms",
    "CallbackLogger",
    "CausalLMLoss",
    "CurvatureAwareOptimizer",
    "CurvatureConfig",
    "CurvatureEstimate",
    "CurvatureInputError",
    "CurvatureOperator",
    "CurvatureStrategyError",
    "CusumMonitor",
    "DoubleBackwardError",
    "EdgeScaling",
    "FiniteDifferenceWarning",
    "JsonlLogger",
    "LRPolicy",
    "Layer",
    "LayerEstimate",
    "MonitorConfig",
    "NonFiniteCurvatureError",
    "ProbeBudgetTracker",
    "RollbackOnAlarm",
    "Spectrum",
    "TraceScaling",
    "WandbLogger",
    "__version__",
    "activation_block_norms",
    "block_norms",
    "causal_lm_loss",
    "curvature_operator",
    "estimate_curvature",
    "group_parameters",
    "layer_spectrum",
    "read_jsonl",
    "unwrap_model",
]
