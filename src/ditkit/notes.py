"""Warnings meant for the person running ditkit (a skipped file, a dropped class folder, a damaged
checkpoint passed over): shown as one plain line, `warning: MESSAGE`, without the Python source line
that the default format adds. They stay ordinary warnings (a UserWarning subclass), so scripts and
tests can filter or capture them as usual."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class DitkitWarning(UserWarning):
    """A user-facing ditkit warning (printed as one plain line)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue `message` as a DitkitWarning, attributed to the caller's caller (like warnings.warn)."""
    warnings.warn(message, DitkitWarning, stacklevel=stacklevel + 1)


def note(message: str) -> None:
    """Tell the person running ditkit something they may not expect (not a problem): `note: MESSAGE` on
    stderr."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def _format(message, category, filename, lineno, line=None) -> str:
    # a plain UserWarning raised inside ditkit is meant for its user too: the same one line
    ours = category is UserWarning and str(Path(filename).resolve()).startswith(PACKAGE)
    if issubclass(category, DitkitWarning) or ours:
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


# installed once; wraps whatever format was there, and changes the look of DitkitWarnings only
if getattr(warnings.formatwarning, "__module__", None) != __name__:
    _python_format = warnings.formatwarning
    warnings.formatwarning = _format
