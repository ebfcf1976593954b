"""The one exception type for mistakes a user can make: printed as one line, never a traceback."""


class UserError(Exception):
    """A problem the user can fix; `str()` is the whole message, `exit_code` the process status."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
