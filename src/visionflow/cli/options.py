"""Options every training verb shares (classifier, GAN, repair), declared once so they read the same."""

from __future__ import annotations


def add_run_options(parser) -> None:
    """--seed, --strict, --device, --resume and --quiet for a verb that trains into --out."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue (or extend with --epochs) the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
