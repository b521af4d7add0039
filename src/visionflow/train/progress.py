"""Progress display for every long loop (training, GAN training, labelling): a rich bar on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_console() -> Console:
    # soft_wrap: a line printed above the bar (a log line, through rich's stderr proxy) is not cut at the terminal's width
    # into several, so that a file name in it stays whole
    return Console(stderr=True, soft_wrap=True)


class _Progress(Progress):
    def stop(self) -> None:
        try:
            super().stop()
        except OSError:  # the terminal closed (predict stops on SIGHUP): nothing is left to clear, and the error
            pass         # would take the place of the interruption on its way out, with its resume hint


def make_progress(console: Console, enabled: bool = True) -> Progress:
    return _Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not enabled,
        # The console is stderr: rich's default would route sys.stdout through it while the bar shows, so that what
        # the caller prints meanwhile (a thread, a library) went to the terminal instead of where stdout goes.
        redirect_stdout=False,
        # stderr is: what is written to it while the bar shows prints above the bar (the CLI's log lines, whose
        # handler writes to sys.stderr as it is at each line: cli.CurrentStderrHandler).
        redirect_stderr=True,
    )
