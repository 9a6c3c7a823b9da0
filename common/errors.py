"""The one exception type for mistakes a user can fix; ``main.py`` prints it as one line, exit 2."""


class UserError(Exception):
    """A problem with the command line, the data or a checkpoint: say what is wrong and the fix."""
