"""The one error type of ``curvopt train``: a problem reported to the user as one line (exit code 2)."""


class TrainError(RuntimeError):
    """A setup problem reported as one line (unknown model, bad argument, unreadable checkpoint)."""
