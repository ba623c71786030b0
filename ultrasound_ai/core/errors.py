"""Error types and the exit codes shared by the CLI and the job runner (docs/ARCHITECTURE.md, the job protocol)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


class InputError(ValueError):
    """Bad input: a missing or unreadable file, a wrong shape or dtype, NaN, an unknown device...

    The message names the input and says what was expected. Maps to exit code 2.
    """


class ChecksumError(InputError):
    """A checkpoint whose sha256 does not match its model card."""


class OutputWriteError(RuntimeError):
    """An output could not be written (a full disk, a file system turned read-only): not the user's
    input, so exit code 1; the message names the user's path, never a temporary one."""


class Cancelled(Exception):
    """The user asked the running task to stop. Maps to exit code 3."""


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, Cancelled) or isinstance(exc, KeyboardInterrupt):
        return EXIT_CANCELLED
    if isinstance(exc, (InputError, FileNotFoundError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE
