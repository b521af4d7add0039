"""CLI verbs for making data sets: `visionflow datasets make moving-digits OUT [...]`."""

from __future__ import annotations

from visionflow.data.moving_digits import FORMATS, LABELS, MovingDigitsSpec


def run_datasets(args) -> int:
    from visionflow import api

    spec = MovingDigitsSpec(clips=args.clips, frames=args.frames, size=args.size, label=args.label,
                            format=args.format, source=args.source, seed=args.seed)
    summary = api.make_dataset(args.out, spec)
    counts = ", ".join(f"{name} {count}" for name, count in summary["classes"].items())
    print(f"wrote {sum(summary['classes'].values())} {args.format} clips to {summary['out']} ({counts})")
    return 0


def register(commands) -> dict:
    """Add this module's verbs to the CLI; returns {verb: handler}."""
    p = commands.add_parser("datasets", help="make data sets")
    actions = p.add_subparsers(dest="datasets_action", required=True)
    make = actions.add_parser("make", help="generate a data set")
    kinds = make.add_subparsers(dest="dataset", required=True)
    m = kinds.add_parser("moving-digits", help="clips of handwritten digits bouncing around a canvas")
    m.add_argument("out", help="the folder to write (one sub-folder per class)")
    m.add_argument("--clips", type=int, default=2000)
    m.add_argument("--frames", type=int, default=16, help="frames per clip")
    m.add_argument("--size", type=int, default=32, help="canvas side in pixels (the digit is half of it)")
    m.add_argument("--label", default="direction", choices=LABELS,
                   help="direction: the 8 motion directions (needs frame order); digit: the digit")
    m.add_argument("--format", default="mp4", choices=FORMATS, help="mp4 (H.264), frames (PNG folders) or npy")
    m.add_argument("--source", default=None, help="an MNIST folder (or image DATA) for the digits; default: built-in digits")
    m.add_argument("--seed", type=int, default=0)
    return {"datasets": run_datasets}
