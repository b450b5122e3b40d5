"""curvopt: per-layer curvature of the training loss, measured while you train.

Data flow, top to bottom: ``layers`` (which tensors form a block) -> ``context`` and
``products`` (Hessian/GGN-vector products) -> ``estimate`` (Hutchinson estimators) ->
``variance`` (probe budget).
"""

from .estimate import CurvatureEstimate, NonFiniteCurvatureError, estimate_curvature
from .layers import ROOT_LAYER, Layer, group_parameters, unwrap_model
from .products import STRATEGIES, CurvatureInputError
from .variance import ProbeBudgetTracker

__version__ = "0.1.0"

__all__ = [
    "ROOT_LAYER",
    "STRATEGIES",
    "CurvatureEstimate",
    "CurvatureInputError",
    "Layer",
    "NonFiniteCurvatureError",
    "ProbeBudgetTracker",
    "__version__",
    "estimate_curvature",
    "group_parameters",
    "unwrap_model",
]
