"""Registry errors (re-exported from :mod:`netshrink.errors`)."""

from netshrink.errors import DuplicateNameError, UnknownNameError

__all__ = ["DuplicateNameError", "UnknownNameError"]
