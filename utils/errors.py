"""The exceptions that end a command with a message instead of a traceback, and their exit statuses.

Library code raises :class:`UserError` (or a subclass) when the user gave something wrong: a missing
folder, a malformed annotation file, an unknown flag value, a checkpoint that does not fit. The message
says what is wrong and how to fix it. Entry points (``train.py``, ``test.py``, tools) catch it, print the
message without a traceback and exit with the exception's ``exit_code`` (see :mod:`utils.entry`):

====  ==========================================================================================
0     finished
1     a bug: Python's traceback (please report it)
2     bad input (:class:`UserError`), or another process of the job failed (:class:`PeerError`)
3     training diverged: a non-finite loss (:class:`TrainingDiverged`); the last good checkpoint is kept
130   stopped by SIGINT (Ctrl-C); 143 by SIGTERM; 138 by SIGUSR1 (:class:`Stopped`, 128 + signal number)
====  ==========================================================================================
"""

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """Bad input from the user; the message alone is shown, without a traceback."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(UserError):
    """The training loss stopped being a finite number; the message names the step and the loss terms."""

    exit_code = EXIT_DIVERGED


class PeerError(UserError):
    """This process stops because another process of a distributed job failed and reported why; the
    message is not printed again (one message per failure, from the process that failed)."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(BaseException):
    """The run was stopped on request (a signal). Like KeyboardInterrupt it is not an ``Exception``, so no
    ``except Exception`` on the way swallows it; the exit status is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
