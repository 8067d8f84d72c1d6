"""Warnings meant for the person running ditkit (a skipped file, a dropped class folder, a damaged
checkpoint passed over): shown as one plain line, `warning: MESSAGE`, without the Python source line
that the default format adds. They stay ordinary warnings (a UserWarning subclass), so scripts and
tests can filter or capture them as usual."""
from __future__ import annotations

import warnings


class DitkitWarning(UserWarning):
    """A user-facing ditkit warning (printed as one plain line)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue `message` as a DitkitWarning, attributed to the caller's caller (like warnings.warn)."""
    warnings.warn(message, DitkitWarning, stacklevel=stacklevel + 1)


def _format(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, DitkitWarning):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


# installed once; wraps whatever format was there, and changes the look of DitkitWarnings only
if getattr(warnings.formatwarning, "__module__", None) != __name__:
    _python_format = warnings.formatwarning
    warnings.formatwarning = _format
