"""The one base class of user-facing errors.

Every error whose message names the file or key at fault and the fix derives from
`QualiclipError` (each module keeps its own subclass, e.g. `ShardError`, next to the code that
raises it). The command line prints such an error as one line and exits 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class QualiclipError(Exception):
    """A user error: bad input, a missing upstream output, a setting that cannot work."""
