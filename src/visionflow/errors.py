"""The one error type that travels up to the CLI (and to any caller of the API), and its kinds.

Raised where user input enters (paths, options, data, run directories). The CLI prints its message as
one line and exits with code 2; anything else is an internal error (exit 1). Interrupted exits 130.
"""


class VisionflowError(Exception):
    """A problem with what the user asked for: a bad path, option, data set or run directory."""


class BrokenImage(VisionflowError):
    """One file of a collection could not be decoded, or not used as asked (`repair run`: a hole that does not fit
    it). Collections skip it (or refuse it with --strict)."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason

    def __reduce__(self):
        # Decoding workers send it back to the main process as a value; rebuild it from both fields.
        return BrokenImage, (self.origin, self.reason)


class NothingGiven(VisionflowError):
    """None of a command's inputs (files, folders, globs) gives anything to read; the message names each with why."""


class Interrupted(VisionflowError):
    """Stopped by Ctrl-C (or by SIGTERM, or SIGHUP as the terminal closes, which the CLI takes as Ctrl-C); the
    message says what was kept and how `--resume` continues. The CLI exits 130."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: the last finished epoch is saved and `--resume` continues from it."""
