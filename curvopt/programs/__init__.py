"""The programs users run, and what they run on: ``cli`` (the ``curvopt`` command), ``demo``,
``train`` (``curvopt train``: timm recipes), ``recipes`` (its arguments), ``data`` and ``synthetic``
(datasets), ``models`` (small reference models for the demo, tests and benchmarks).

The bottom of the chain: may import everything above; nothing imports it but the CLI entry point.
"""
