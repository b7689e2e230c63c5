"""User-facing errors: one line, no traceback, non-zero exit."""


class UserError(Exception):
    """An error caused by the user's input (config, data, paths).

    The CLI prints ``error: <message>`` on one line and exits with code 2. The message names the file and
    line, or the config key, and says what to fix.
    """


def located(path, line: int | None, message: str) -> UserError:
    """Build a UserError that names ``path`` (and ``line`` when given)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UserError(f"{where}: {message}")
