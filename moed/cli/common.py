"""What every moectl command shares: its exit codes and the error it reports in one line."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure to report to the person in one line (exit code ``code``)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code
