"""CLI verbs for image classification: train, evaluate, predict, models, preview, demo."""

from __future__ import annotations

import io
import itertools
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from visionflow.cli import none_succeeded
from visionflow.cli.options import (add_engine_options, add_precision_option, add_run_options, add_shape_options,
                                    given_flags, ignored_flags, ignored_on_resume)
from visionflow.config import EVAL_AUGMENTS, OPTIMIZERS, SCHEDULES, TrainConfig
from visionflow.data.transforms import DEFAULT_STRENGTHS
from visionflow.errors import Interrupted, VisionflowError
from visionflow.infer.predict import FORMATS as PREDICT_FORMATS, labelled_paths, write_rows
from visionflow.models import model_entry
from visionflow.runs import check_output_file
from visionflow.train.presets import PRESETS, train_config


def _model_options(text: str | None) -> dict:
    """'hidden=128,layers=2,bidirectional=true' -> {'hidden': 128, 'layers': 2, 'bidirectional': True}"""
    options: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise VisionflowError(f"--model-options: '{item}' is not key=value")
        value = value.strip()
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key.strip()] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                options[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip()] = value
    return options


def add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train a classifier on DATA")
    p.add_argument("data", help="class folders of images or of clips (videos, .npy, frame folders), train/ with val/ or "
                                "test/, an MNIST folder, or a built-in name (digits)")
    p.add_argument("--model", default=TrainConfig.model, help="a registered model (see `visionflow models`)")
    p.add_argument("--model-options", default=None, help="family options as key=value,... (e.g. hidden=128)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--val", default=None, help="separate validation DATA")
    p.add_argument("--val-split", type=float, default=TrainConfig.val_split, help="held-out fraction when DATA has no val/test part")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10; with --resume: extend to this many)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS)
    p.add_argument("--momentum", type=float, default=TrainConfig.momentum, help="--optimizer sgd: its Nesterov momentum (0 = plain SGD)")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES)
    p.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing)
    p.add_argument("--patience", type=int, default=TrainConfig.patience, help="early stopping: epochs without a better validation accuracy (0 = off)")
    p.add_argument("--class-weights", default=TrainConfig.class_weights, choices=("none", "auto"))
    p.add_argument("--balanced-sampler", action="store_true", help="sample classes equally often")
    add_shape_options(p)
    p.add_argument("--augment", default=TrainConfig.augment,
                   help="e.g. flip,rotate=15,crop=0.8,elastic=0.5 (none = off); a bare name takes its default: "
                        + ", ".join(f"{name}={value:g}" for name, value in DEFAULT_STRENGTHS.items()))
    p.add_argument("--gan-augment", default=None, help="a conditional GAN run: add its samples to the training images")
    p.add_argument("--gan-ratio", type=float, default=TrainConfig.gan_ratio, help="with --gan-augment: generated images per real image")
    p.add_argument("--frames", type=int, default=TrainConfig.frames, help="clips: frames sampled per clip")
    p.add_argument("--temporal-pool", default=None, choices=("rnn", "mean"),
                   help="cnn-rnn: mean = average frame features, no recurrence (the order-blind control)")
    add_run_options(p)
    p.add_argument("--preset", default=None,
                   help=f"a training recipe ({', '.join(sorted(PRESETS))}); flags given override it")
    p.add_argument("--lookahead", type=int, default=TrainConfig.lookahead, help="every N steps pull the weights to their running average (0 = off)")
    p.add_argument("--augment-eval", default=TrainConfig.augment_eval, choices=EVAL_AUGMENTS,
                   help="test-time augmentation recorded in the run: flip = mean of the image and its mirror; "
                        "flip-translate = airbench's 6 views (flips of the image and of two 1-pixel shifts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (pays off on long runs)")
    add_precision_option(p)
    # Flags left out parse as None so that a --preset's value stands unless a flag is given; the defaults
    # written above are TrainConfig's own, which apply when neither sets a value.
    p.set_defaults(**{name: None for name in TRAIN_FLAGS})


# The train flags that map one to one onto TrainConfig fields.
TRAIN_FLAGS = ("model", "val", "val_split", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule",
               "label_smoothing", "patience", "class_weights", "balanced_sampler", "image_size", "channels", "augment",
               "frames", "seed", "strict", "device", "lookahead", "augment_eval", "gan_augment", "gan_ratio",
               "compile", "precision")


def run_train(args) -> int:
    from visionflow import api

    if args.resume:
        ignored = ignored_on_resume(args, [name for name in (*TRAIN_FLAGS, "preset", "model_options", "temporal_pool")
                                           if name != "val"])
        report = api.resume(args.out, epochs=args.epochs, show_progress=not args.quiet, data=args.data, val=args.val,
                            device=args.device, flag_warnings=ignored)
    else:
        model_options = _model_options(args.model_options)
        if args.temporal_pool is not None:  # an alias for --model-options temporal_pool=...
            model_options["temporal_pool"] = args.temporal_pool
        cfg = train_config(args.data, args.out, args.preset, model_options=model_options, **given_flags(args, TRAIN_FLAGS))
        ignored = [] if model_entry(cfg.model).input_kind == "clip" else ignored_flags(
            args, ["frames"], f"model '{cfg.model}' takes images, not clips")
        report = api.train(cfg, show_progress=not args.quiet, flag_warnings=ignored)
    validation = report["validation"]
    noun, rate = _units(report["input_kind"])
    print(f"{args.out}: validation accuracy {validation['accuracy']:.4f}  top-{validation['top_k']} "
          f"{validation['top_k_accuracy']:.4f}  macro-F1 {validation['macro_f1']:.4f}  "
          f"({validation['n']} {noun} of {report['image_size']}x{report['image_size']}x{report['channels']}, "
          f"best epoch {report['best_epoch']}, "
          f"{report['train_images_per_second']:,.0f} train {rate}, {report['skipped_files']} skipped files)")
    return 0


def _units(input_kind: str) -> tuple[str, str]:
    """What the printed counts and rates count: ("images", "img/s") or ("clips", "clips/s")."""
    return ("clips", "clips/s") if input_kind == "clip" else ("images", "img/s")


def run_evaluate(args) -> int:
    from visionflow import api

    metrics = api.evaluate(args.run_dir, args.data, device=args.device, weights=args.weights, batch_size=args.batch_size,
                           strict=args.strict, engine=args.engine, precision=args.precision, augment_eval=args.augment_eval)
    say_engine(metrics["engine"], metrics["precision"], metrics["device"])
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"n {metrics['n']}  accuracy {metrics['accuracy']:.4f}  top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}  "
          f"macro-F1 {metrics['macro_f1']:.4f}  {metrics['images_per_second']:,.0f} {_units(metrics['input_kind'])[1]}  "
          f"skipped {metrics['skipped_files']}")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, row in metrics["per_class"].items():
        print(f"{name:<16}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}")
    return 0


def say_engine(engine: str, precision: str, device: str) -> None:
    """One line on stderr saying what labelled: `--engine auto` and `--precision auto` choose by the machine."""
    print(f"engine {engine}, {precision}, {device}", file=sys.stderr)


def _output_format(output: str | None) -> str:
    """The format an --output file's name asks for: rows.csv is CSV, rows.jsonl JSON lines, anything else a table."""
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in PREDICT_FORMATS else "table"


def run_predict(args) -> int:
    from visionflow import api
    from visionflow.train.progress import make_console, make_progress

    fmt = args.format or _output_format(args.output)
    done: set[str] = set()
    if args.output:
        check_output_file(Path(args.output), "--output")  # before the labelling, not after its first batch
    if args.resume:
        if not args.output:
            raise VisionflowError("--resume continues the rows in --output: give --output")
        done = labelled_paths(args.output, fmt)
    # Rows go to stdout as it is now: make_progress leaves sys.stdout alone (rich's default routed it to its console,
    # stderr, and rows piped or redirected had landed on the terminal). Rows printed on the terminal show their own
    # progress: no bar then.
    stdout = sys.stdout
    console = make_console()
    show = console.is_terminal and not args.quiet and (args.output is not None or not stdout.isatty())
    with make_progress(console, show) as progress:
        task = progress.add_task("labelling", total=None, status="")
        labelled = api.predict(args.run_dir, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                               device=args.device, weights=args.weights, engine=args.engine, precision=args.precision,
                               augment_eval=args.augment_eval, strict=args.strict, skip=done,
                               on_batch=lambda n: progress.update(task, advance=n))
        progress.update(task, total=labelled.total)  # the inputs as listed for labelling: a folder is walked once
        # The first row before --output is opened: a wrong run or input must not empty an existing file.
        first = next(labelled, None)
        rows = itertools.chain([first], labelled) if first is not None else iter(())
        # surrogateescape: file names that are not UTF-8 are written byte for byte
        if not args.output and isinstance(stdout, io.TextIOWrapper):
            stdout.reconfigure(errors="surrogateescape")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # as every other --out
        appending = bool(done)  # rows kept from before (a file trimmed to its header keeps none: written anew)
        out = (open(args.output, "a" if appending else "w", newline="", errors="surrogateescape") if args.output
               else nullcontext(stdout))
        with out as stream:
            try:
                count = write_rows(rows, stream, fmt, header=not appending)
            except KeyboardInterrupt:
                if not args.output:
                    raise
                # leaving `with out` flushes every row written so far, each whole: --resume appends the others
                raise Interrupted(f"interrupted; the rows written so far are in {args.output}: the same command "
                                  "with --resume labels the rest") from None
    # Every input this command labelled failed, whatever rows --resume kept from before: a script must tell that
    # nothing new was labelled from a resume that labelled the rest (none left to label: count 0, exit 0).
    if count and labelled.failed == count:
        raise none_succeeded(count, "input", "labelled", f"see the error row{'s' if count > 1 else ''}"
                                                         + (f" in {args.output}" if args.output else ""))
    say_engine(labelled.engine, labelled.precision, labelled.device)  # after the rows: an error stays one line
    if args.output:
        earlier = f", after the {len(done)} it held" if appending else ""
        print(f"wrote {count} row{'' if count == 1 else 's'} to {args.output}{earlier}", file=sys.stderr)
    return 0


def run_models(args) -> int:
    from visionflow import api

    shade = {1: "grey", 3: "colour"}
    (image_channels, image_side), (frame_channels, frame_side) = api.COUNTED_AT["image"], api.COUNTED_AT["clip"]
    print(f"parameters for 10 classes, counted on {image_side}x{image_side} {shade[image_channels]} images and on "
          f"clips of {frame_side}x{frame_side} {shade[frame_channels]} frames")
    print(f"{'model':<14}{'input':<8}{'parameters':>12}  summary")
    for name, kind, params, summary in api.models_table():
        print(f"{name:<14}{kind:<8}{params:>12,}  {summary}")
    return 0


def run_preview(args) -> int:
    from visionflow import api

    path = api.preview(args.data, args.augment, args.out, count=args.count, seed=args.seed,
                       image_size=args.image_size, channels=args.channels, frames=args.frames)
    print(f"wrote {path}")
    return 0


def run_demo(args) -> int:
    from visionflow import api

    result = api.demo(args.out, show_progress=not args.quiet)
    evaluation = result["evaluation"]
    print(f"\nvisionflow demo: seed-cnn on the built-in digits ({result['report']['parameters']:,} parameters)")
    print(f"  held-out accuracy   {evaluation['accuracy']:.4f}  ({evaluation['n']} images)")
    print(f"  top-{evaluation['top_k']} accuracy      {evaluation['top_k_accuracy']:.4f}")
    print(f"  macro F1            {evaluation['macro_f1']:.4f}")
    print(f"  training speed      {result['report']['train_images_per_second']:,.0f} images/s")
    print(f"  labelling speed     {evaluation['images_per_second']:,.0f} images/s")
    print(f"  run directory       {args.out}\n")
    print(f"  {'image':<44}{'true':>5}{'predicted':>11}{'score':>8}")
    for row in result["predictions"]:
        name = row["path"].rsplit("/", 1)[-1]
        print(f"  {name:<44}{result['truth'][row['path']]:>5}{row['label']:>11}{row['score']:>8.3f}")
    return 0


def register(commands) -> dict:
    """Add this module's verbs to the CLI; returns {verb: handler}."""
    add_train_parser(commands)

    p = commands.add_parser("evaluate", help="score a run on DATA (its test part, or the run's held-out part)")
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weights", default="best", choices=("best", "last"))
    add_engine_options(p)
    p.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")

    p = commands.add_parser("predict", help="label images or clips: files, folders (recursive) or globs")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or globs: images, or clips for a clip run")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", default=None, choices=PREDICT_FORMATS,
                   help="default: what --output's name says (.csv, .jsonl), else table")
    p.add_argument("--output", default=None, help="write rows to this file instead of stdout (replaced if it exists; see --resume)")
    p.add_argument("--resume", action="store_true",
                   help="after an interruption: keep the rows --output holds (csv or jsonl), label only the inputs it "
                        "has no row for, and append theirs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", default="best", choices=("best", "last"))
    add_engine_options(p)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of writing an error row")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("models", help="list the registered models")

    p = commands.add_parser("preview", help="write a grid of augmented samples")
    p.add_argument("data")
    p.add_argument("--augment", required=True, help="a SPEC as train takes it, e.g. flip,rotate=15 (see train --help)")
    p.add_argument("--out", required=True, help="the grid picture to write (.png, .jpg, ...; replaced if it exists)")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    add_shape_options(p)
    p.add_argument("--frames", type=int, default=None, help="clip data: frames per clip, one clip per row (default 16; give it for folders of frame folders, "
                        "which are otherwise read as images)")

    p = commands.add_parser("demo", help="train, evaluate and label on the built-in digits (offline, < 1 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "models": run_models,
            "preview": run_preview, "demo": run_demo}


