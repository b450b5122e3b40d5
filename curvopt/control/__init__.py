"""Controllers that act on estimates: the CUSUM memorisation ``monitor``, the layer-wise LR
``scaling`` policies, and the ``optimizer`` wrapper that schedules estimates during training.

May import :mod:`curvopt.engine` and :mod:`curvopt.estimators`; never reporting or programs
(loggers reach the optimizer through its ``CurvatureSink`` protocol, not an import).
"""
