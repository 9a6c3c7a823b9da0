"""The one exception type for mistakes a user can fix; ``main.py`` prints it as one line, exit 2."""


class UserError(Exception):
    """A problem with the command line, the data or a checkpoint: say what is wrong and the fix."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after saving its exact position; ``main.py`` exits with status 3
    (EXIT_PREEMPTED), which a job script can requeue on."""


EXIT_PREEMPTED = 3


class BadImage(UserError):
    """An image file that cannot be read; ``--skip_bad_images`` replaces it instead of stopping."""


def first_line(err: BaseException) -> str:
    """An exception as one line: an OSError's reason, else the first line of its text (or its type's name)."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0]


def worker_message(message: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker, whose text torch wraps
    as 'Caught X in DataLoader worker process N. Original Traceback ... module.X: <message>'."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]  # "package.module.ClassName: the message"
    name, sep, rest = last.partition(": ")
    return rest if sep and " " not in name else last
