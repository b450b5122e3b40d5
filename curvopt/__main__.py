"""``python -m curvopt`` is the ``curvopt`` command."""

from .cli import main

raise SystemExit(main())
