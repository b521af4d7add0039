"""Options every training verb shares (classifier, GAN, repair), declared once so they read the same."""

from __future__ import annotations

from visionflow.config import EVAL_AUGMENTS, PRECISIONS


def add_run_options(parser) -> None:
    """--seed, --strict, --device, --resume and --quiet for a verb that trains into --out."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue (or extend with --epochs) the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_engine_options(parser) -> None:
    """--device, --engine, --precision and --augment-eval for a verb that labels images with a trained run."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "onnx"),
                        help="auto: PyTorch where it runs bf16 (a GPU, a CPU with AVX512-BF16/AMX) and for "
                             "recurrent models, else ONNX Runtime on the CPU (cached as RUN_DIR/best.onnx)")
    add_precision_option(parser)
    parser.add_argument("--augment-eval", default=None, choices=EVAL_AUGMENTS,
                        help="test-time augmentation instead of the one the run recorded")


def add_precision_option(parser) -> None:
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast where the hardware computes bf16 (CUDA, AVX512-BF16, AMX), else fp32")
