"""The command line: a thin layer over the Python API. Every option maps onto one API argument.

Each module here adds its verbs with `register(commands) -> {verb: handler}`.
Exit codes: 0 success, 2 a user error or a path the system refused (one line on stderr, no traceback), or no input
of predict or repair run done (each failed, with its error row or warning),
1 an internal error, 130 interrupted: by Ctrl-C, or by SIGTERM (`kill`) or SIGHUP (the terminal closed), which every
verb takes as Ctrl-C (training leaves a resumable checkpoint; predict's --output holds whole rows that --resume
continues).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from contextlib import contextmanager

from visionflow.errors import Interrupted, VisionflowError


# The arguments that name files or folders, in every verb. '~' is expanded in them as DATA's is (open_data): the
# shell leaves it alone when quoted ('~/runs') or after '=' (--out=~/runs), and a folder named '~' would be made.
PATH_ARGUMENTS = ("data", "run_dir", "inputs", "images", "out", "output", "val", "gan_augment", "mask", "examples",
                  "source", "classifier")


def expand_home(args: argparse.Namespace) -> None:
    """'~' and '~user' at the start of every path argument given (PATH_ARGUMENTS), as the shell would."""
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(item) for item in value])


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other user error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A word that starts with '-' and a digit is a value, not an unknown option: argparse (3.11) took only a plain
        # negative number (-1, -0.5) as one, so `--box -1,0,5,5` was "expected one argument" and never reached the
        # box's own check, which says what a box may be. No option of ours is named like a number.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str):
        raise VisionflowError(f"{message} (see `{self.prog} --help`)")

    def add_argument(self, *names, **options):
        """Every option's --help says its default: written here, where it is declared, because the training verbs
        then reset their config flags to None (a preset or the config supplies the value unless one is given)."""
        default = options.get("default")
        if (names and names[0].startswith("-") and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in options.get("help", "")):
            options["help"] = f"{options.get('help', '')} (default {default})".strip()
        return super().add_argument(*names, **options)


def build_parser() -> tuple[ArgumentParser, dict]:
    parser = ArgumentParser(prog="visionflow", description="Deep learning on images: train, evaluate, label, generate.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch and ONNX Runtime, and at most as many image-decoding workers "
                             "(default: one per core). On a machine that other jobs share, fewer threads than "
                             "cores avoids threads waiting on each other")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    handlers: dict = {}
    # The verb modules bring in torch (seconds): imported here, inside main's try, so that Ctrl-C while it loads
    # is an interruption like any other, not a traceback.
    from visionflow.cli import classify, datasets, export, gan, repair

    for module in (classify, datasets, gan, repair, export):
        handlers.update(module.register(commands))
    _name_verbs(parser)
    return parser, handlers


def _verb_groups(parser: argparse.ArgumentParser) -> list:
    # argparse keeps its sub-commands in a private action type; read only, to name verbs in messages
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def _name_verbs(parser: argparse.ArgumentParser) -> None:
    """A missing verb is named by its choices ({train,sample,evaluate}), not by argparse's dest (gan_command)."""
    for group in _verb_groups(parser):
        group.metavar = group.metavar or "{" + ",".join(group.choices) + "}"
        for sub in group.choices.values():
            _name_verbs(sub)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb the command line chose (`visionflow gan train`), for its --help."""
    for group in _verb_groups(parser):
        chosen = getattr(args, group.dest, None)
        if chosen in group.choices:
            return _chosen_parser(group.choices[chosen], args)
    return parser


def _refuse_global_options_after_the_verb(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A global option (--threads) given after the verb, or between a verb and its sub-verb, where argparse does not
    look for it (it calls it unrecognized, or takes its value for a sub-verb): a one-line error with the command that
    puts it before the verb."""
    options = {name: action for action in parser._actions  # the options of `visionflow` itself
               if action.option_strings and not isinstance(action, argparse._HelpAction)
               for name in action.option_strings}
    verb = 0
    while verb < len(argv) and argv[verb].startswith("-"):  # past the global options given before the verb
        verb += 2 if argv[verb] in options and options[argv[verb]].nargs != 0 else 1
    for at in range(verb + 1, len(argv)):
        option = argv[at].split("=", 1)[0]  # --threads of --threads=2
        if option not in options:
            continue
        width = 1 if "=" in argv[at] or options[option].nargs == 0 else 2  # with its value, as typed after it
        moved = argv[at:at + width] + argv[:at] + argv[at + width:]
        parser.error(f"{option} is a global option, given before the verb: `{parser.prog} {shlex.join(moved)}`")


def none_succeeded(count: int, noun: str, verb: str, why: str) -> VisionflowError:
    """The error when every one of `count` inputs failed, each with its error row or warning as when some fail among
    others: exit 0 would say that the command did its work."""
    what = f"the {noun} could not be {verb}" if count == 1 else f"none of the {count} {noun}s could be {verb}"
    return VisionflowError(f"{what}: {why}")


def _say_if_possible(message: str) -> None:
    """A line on stderr, unless stderr is gone: a terminal closed (predict stops on SIGHUP) refuses writes (EIO)."""
    try:
        print(message, file=sys.stderr)
    except OSError:
        pass


@contextmanager
def _stopping_as_ctrl_c_does():
    """SIGTERM (`kill`) and SIGHUP (the terminal closed) stop a verb as Ctrl-C does, raising KeyboardInterrupt:
    Python's default for them ends the process at once, with no word, and what Ctrl-C keeps was lost (training's
    message naming the saved epochs and the command that continues them; the rows still in predict's --output
    buffer, the last one written out often cut short). A signal ignored when the command started (`nohup`) stays
    ignored."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # no SIGHUP on Windows
    earlier = {number: signal.getsignal(number) for number in numbers}
    for number in numbers:
        if earlier[number] is not signal.SIG_IGN:
            signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)


class CurrentStderrHandler(logging.StreamHandler):
    """Log lines to sys.stderr as it is when each is written, as logging's own last-resort handler does, not to the
    stream it was when logging was set up: while a progress bar shows, rich puts a proxy there that prints above the
    bar, and a warning written to the stream itself landed on the bar's line, right after it."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def warnings_to_stderr() -> logging.Handler:
    """The handler through which the CLI says its warnings: 'warning: ...' on stderr."""
    handler = CurrentStderrHandler()
    handler.setLevel(logging.WARNING)  # warnings only, whatever level a caller sets on the loggers
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    return handler


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, handlers=[warnings_to_stderr()])
    try:
        from PIL import Image
        import torch

        # The decoder refuses such files itself and names them (data/decode.py, MAX_PIXELS); Pillow's warning
        # would say it a second time, with a line of its own source code.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        parser, handlers = build_parser()
        _refuse_global_options_after_the_verb(parser, sys.argv[1:] if argv is None else argv)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would send the user to the top-level help; the verb's own says what it takes
            _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        expand_home(args)
        if args.threads is not None:
            if args.threads < 1:
                raise VisionflowError(f"--threads must be at least 1 (got {args.threads})")
            torch.set_num_threads(args.threads)  # this process is the CLI's own: the setting ends with it
        with _stopping_as_ctrl_c_does():
            return handlers[args.command](args)
    except Interrupted as exc:
        _say_if_possible(f"visionflow: {exc}")
        return 130
    except VisionflowError as exc:
        print(f"visionflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say_if_possible("visionflow: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # A path the system refused (a file where a folder should be, no permission) or a full disk: the
        # user's to fix, so one line naming it. Any other OSError without a path is an internal error.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"visionflow: error: {where}no space left to write (the disk or the quota is full)", file=sys.stderr)
            return 2
        if exc.filename is None:
            raise
        in_the_way = isinstance(exc, (FileExistsError, NotADirectoryError))  # mkdir -p and open keep to folders
        print(f"visionflow: error: {exc.filename}: "
              f"{'a file stands where a folder is needed' if in_the_way else exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
