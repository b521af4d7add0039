"""CLI verb `export`: write a run's model in a format other runtimes load (ONNX)."""

from __future__ import annotations


def run_export(args) -> int:
    from visionflow.infer.export import export_run

    path = export_run(args.run_dir, args.format, out=args.out, weights=args.weights)
    print(f"wrote {path}")
    return 0


def register(commands) -> dict:
    """Add this module's verbs to the CLI; returns {verb: handler}."""
    p = commands.add_parser("export", help="export a run's model (ONNX: fp32, dynamic batch, preprocessing in its metadata)")
    p.add_argument("run_dir")
    p.add_argument("--format", default="onnx", choices=("onnx",))
    p.add_argument("--out", default=None, help="the file to write (default RUN_DIR/best.onnx or RUN_DIR/last.onnx)")
    p.add_argument("--weights", default="best", choices=("best", "last"))
    return {"export": run_export}
