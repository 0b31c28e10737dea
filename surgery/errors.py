"""One exception type for every mistake a user can make.

The CLI prints a SurgeryError as one line on stderr and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class SurgeryError(Exception):
    """A problem with the user's input: a path, a flag, a file or a tensor. The message names it."""
