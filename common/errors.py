"""The one exception type for mistakes a user can fix; ``main.py`` prints it as one line, exit 2."""


class UserError(Exception):
    """A problem with the command line, the data or a checkpoint: say what is wrong and the fix."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after saving its exact position; ``main.py`` exits with status 3
    (EXIT_PREEMPTED), which a job script can requeue on."""


EXIT_PREEMPTED = 3
