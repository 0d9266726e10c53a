"""The one exception type for user errors.

Anything the user can fix (a missing file, a malformed dataset, an impossible option) raises
`GlmgymError`; the CLI prints its message and exits with code 2 without a traceback.
"""

__all__ = ["GlmgymError"]


class GlmgymError(Exception):
    """A user error: bad input, a missing file, an impossible option."""
