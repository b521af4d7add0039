"""Progress display for every long loop (training, GAN training, labelling): a rich bar on stderr."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("visionflow")


def make_console() -> Console:
    return Console(stderr=True)


class _AboveTheBar(logging.Handler):
    """The visionflow logger's lines printed through the bar's console, which puts them above the bar, as rich says
    to print while a bar shows: the handlers they otherwise reach write to stderr itself, and a warning landed on the
    bar's own line, right after it. Each line is formatted as those handlers would have (the CLI's "warning: ...")."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console
        self.setFormatter(next((h.formatter for h in logging.getLogger().handlers if h.formatter), None))

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the text as it is: no markup, emoji or highlighting read into a file name, and no wrapping
            self.console.print(self.format(record), markup=False, emoji=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


class _Progress(Progress):
    _above: _AboveTheBar | None = None

    def start(self) -> None:
        super().start()
        if not self.disable and self.console.is_terminal:  # a bar is drawn: the visionflow logger writes above it
            self._above, self._propagated = _AboveTheBar(self.console), log.propagate
            log.addHandler(self._above)
            log.propagate = False

    def stop(self) -> None:
        if self._above is not None:  # back to the handlers it had, writing to stderr
            log.removeHandler(self._above)
            log.propagate, self._above = self._propagated, None
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
    )
