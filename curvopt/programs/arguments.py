"""Command-line parsing that fails in one line: the error, the closest flag for a mistyped one, where help is."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn


def closest_flag(flag: str, known: list[str]) -> str | None:
    """The known option string a mistyped ``--flag`` most likely means (``--lr-rate`` → ``--lr``)."""
    name = flag.split("=", 1)[0]
    extended = [k for k in known if name.startswith(k + "-")]  # --lr-rate: --lr with a word too many
    if extended:
        return max(extended, key=len)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixed = [k for k in known if k.startswith(name)]
    return min(prefixed, key=len) if prefixed else None


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` of ``parser`` and of its sub-commands."""
    flags = []
    for action in parser._actions:
        flags += [s for s in action.option_strings if s.startswith("--") and s not in ("--help", "--version")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags += _option_strings(sub)
    return flags


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (argparse prints the whole usage first: 47 lines for
    ``curvopt train``), naming the closest flag when an argument is not recognised."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            close = closest_flag(unknown.group(1), _option_strings(self))
            hint = f" (did you mean {close}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see {self.prog} --help\n")
