"""The one exception a user can cause: the CLI prints its message (no traceback) and exits 2."""


class AttnprobeError(Exception):
    """A problem with the user's input, stated in one line with how to fix it."""
