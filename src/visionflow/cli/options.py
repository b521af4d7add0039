"""Options every training verb shares (classifier, GAN, repair), declared once so they read the same."""

from __future__ import annotations

from visionflow.config import EVAL_AUGMENTS, PRECISIONS
from visionflow.infer.predictor import ENGINES


def add_run_options(parser) -> None:
    """--seed, --strict, --device, --resume and --quiet for a verb that trains into --out."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")
    add_device_option(parser)
    parser.add_argument("--resume", action="store_true", help="continue (or extend with --epochs) the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_engine_options(parser) -> None:
    """--device, --engine, --precision and --augment-eval for a verb that labels images with a trained run."""
    add_device_option(parser)
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="auto: PyTorch where it runs bf16 (a GPU, a CPU with AVX512-BF16/AMX) and for recurrent "
                             "and clip models, else ONNX Runtime on the CPU (its graph cached as RUN_DIR/best.onnx or "
                             "last.onnx, and exported again when the weights change)")
    add_precision_option(parser)
    parser.add_argument("--augment-eval", default=None, choices=EVAL_AUGMENTS,
                        help="test-time augmentation instead of the one the run recorded")


def add_precision_option(parser) -> None:
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast where the hardware computes bf16 (CUDA, AVX512-BF16, AMX), else fp32")


def given_flags(args, names) -> dict:
    """The flags among `names` the command line gave. A training verb's parser defaults its config flags to None
    (`set_defaults`), so that the config's own defaults apply to the others and `--resume` can tell what it ignores."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def ignored_flags(args, names, reason: str) -> list[str]:
    """The warning naming the flags among `names` the command line gave that will not be used, and why; none when it
    gave none. The API says it once the run and the data are checked (`flag_warnings`): said here, before them, it
    would come before a user error's one line."""
    ignored = list(given_flags(args, names))
    if not ignored:
        return []
    return [f"{reason}; ignored: {', '.join('--' + name.replace('_', '-') for name in ignored)}"]


def ignored_on_resume(args, names) -> list[str]:
    """--resume continues with the run's recorded settings but --epochs and --device (where it runs now): the warning
    naming the flags given that it will not use."""
    return ignored_flags(args, [name for name in names if name not in ("epochs", "device")],
                         "--resume continues with the run's own settings")


def add_shape_options(parser, size_help: str = "side in pixels") -> None:
    """--image-size and --channels for a verb that decodes images to one shape."""
    parser.add_argument("--image-size", type=int, default=None, help=f"{size_help} (default: measured from the data)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="1 grey, 3 colour (default: measured from the data)")


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
