"""``curvopt train``: a timm training script around :class:`~curvopt.CurvatureAwareOptimizer`."""
