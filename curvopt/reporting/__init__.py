"""Display: where metrics go and how they are read. ``loggers`` (JSONL file, callbacks),
``wandb_logger`` (Weights & Biases), ``plots`` (figures from logged records), ``report``
(``curvopt report``: PNG/HTML pages), ``tables`` (terminal tables).

May import the engine, the estimators and the controllers; never the programs.
"""
