"""One exception type for what the user can fix.

Every error a user can act on (a bad file, flag, folder or model) derives from :class:`UserError`; the CLI prints
it as one line and exits with status 2. Any other exception is a bug: the CLI lets its traceback through (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the file or flag and what is wrong."""
