"""The one exception type for bad input.

Library code raises :class:`UserError` (or a subclass) when the user gave something wrong: a missing
folder, a malformed annotation file, an unknown flag value, a checkpoint that does not fit. The message
says what is wrong and how to fix it. Entry points (``train.py``, ``test.py``, tools) catch it, print the
message without a traceback and exit with status 2.
"""


class UserError(Exception):
    """Bad input from the user; the message alone is shown, without a traceback."""
