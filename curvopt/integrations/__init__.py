"""Framework integrations: curvature inside the Hugging Face Trainer and Lightning, through their own callbacks.

* :mod:`~curvopt.integrations.huggingface` — ``CurvatureCallback`` for ``transformers.Trainer``;
* :mod:`~curvopt.integrations.lightning` — ``CurvatureCallback`` for ``lightning.Trainer``;
* :mod:`~curvopt.integrations.session` — what both share: the batch recorder (the inputs of the latest
  training forward) and the tracking session (the wrapper stepping alongside the framework's optimizer,
  its metrics and alarms, its state for checkpoints).

May import engine, estimators, control and reporting (never programs); the frameworks themselves are
imported only by the module of each, so ``import curvopt`` needs neither.
"""
