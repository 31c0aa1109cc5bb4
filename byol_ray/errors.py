"""The errors a command reports in one line (exit 2) rather than with a traceback. Import-light on purpose:
a node-side command (``byol-ray spot-watch``) reaches them without importing torch."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts; the message names key and fix."""


class NoSpaceError(OSError):
    """A disk filled up while a file was written (the partial file is removed; what was there before is intact)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()
