"""``python -m curvopt`` is the ``curvopt`` command."""

from .programs.cli import main

raise SystemExit(main())
