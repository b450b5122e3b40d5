"""Speed, memory and training-quality studies, each a module run as ``python -m benchmarks.<name>`` from the
repository root; results, machine and exact commands in ``benchmarks/RESULTS.md``. Shared pieces are imported as
``from benchmarks.<module> import …``."""
