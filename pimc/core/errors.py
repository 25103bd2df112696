"""One exception type for user-facing errors.

A :class:`PimcError` carries a one-line message that names the file, node or
option at fault and says what to do.  The CLI prints it as ``pimc: error: ...``
and exits with status 2, without a traceback.
"""


class PimcError(Exception):
    """A user-facing error: bad input file, bad option, unsupported model."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
