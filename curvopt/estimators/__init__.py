"""Estimators built on the engine's products, one module per kind of quantity.

``trace`` (per-layer Hutchinson traces, GN traces, GN-Gap), ``blocks`` (the L × L inter-layer map),
``spectra`` (Lanczos / SLQ per layer), ``budget`` (probe budget K* from the variance decomposition),
``distributed`` (one all-reduce per estimate under torch.distributed).
May import :mod:`curvopt.engine`; never the controllers, reporting or programs.
"""
