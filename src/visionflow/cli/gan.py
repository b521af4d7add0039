"""CLI verbs for image generation: `visionflow gan train | sample | evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

from visionflow.cli.options import (add_device_option, add_run_options, add_shape_options, given_flags,
                                    ignored_on_resume)
from visionflow.gan.losses import GAN_LOSSES
from visionflow.gan.train import GanConfig

# The `gan train` flags that set GanConfig fields (--no-minibatch-std sets minibatch_std). They parse as None unless
# given, so GanConfig's defaults apply and --resume can name the ones it ignores.
GAN_FLAGS = ("epochs", "conditional", "image_size", "channels", "loss", "spectral_norm", "no_minibatch_std",
             "mode_seeking", "batch_size", "lr", "seed", "strict", "device")


def run_gan_train(args) -> int:
    from visionflow.api import gan as api
    given = given_flags(args, GAN_FLAGS)
    if args.resume:
        summary = api.resume_gan(args.out, epochs=args.epochs, show_progress=not args.quiet, data=args.data,
                                 device=args.device, flag_warnings=ignored_on_resume(args, GAN_FLAGS))
    else:
        if "no_minibatch_std" in given:
            given["minibatch_std"] = not given.pop("no_minibatch_std")
        ignored = []
        if given.get("mode_seeking") and not given.get("conditional"):  # 0 (off) is what it is anyway
            ignored.append("--mode-seeking keeps the samples of one class apart: it applies to --conditional GANs "
                           "only; ignored")
        summary = api.train_gan(GanConfig(data=args.data, out=args.out, **given), show_progress=not args.quiet,
                                flag_warnings=ignored)
    last = summary["rows"][-1] if summary["rows"] else {}
    print(f"{args.out}: {summary['epochs']} epoch{'' if summary['epochs'] == 1 else 's'}  D loss {last.get('d_loss', float('nan')):.4f}  "
          f"G loss {last.get('g_loss', float('nan')):.4f}  diversity {last.get('diversity', float('nan')):.3f}  "
          f"({summary['skipped_files']} skipped files; samples in {args.out}/samples/)")
    return 0


def run_gan_sample(args) -> int:
    from visionflow.api import gan as api

    written = api.sample(args.run_dir, args.n, args.out, label=args.label, seed=args.seed, device=args.device)
    print(f"wrote {args.out}" if written == [Path(args.out)] else f"wrote {len(written)} images to {args.out}")
    return 0


def run_gan_evaluate(args) -> int:
    from visionflow.api import gan as api

    result = api.evaluate_gan(args.run_dir, args.data, classifier=args.classifier, count=args.n, seed=args.seed,
                              show_progress=not args.quiet, device=args.device, strict=args.strict)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"domain FID ({result['features']}; lower is closer to the real images)")
    print(f"  generator            {result['fid']:10.4f}   ({result['n']} samples vs {result['n_real_reference']} training images)")
    print(f"  held-out real images {result['fid_real_floor']:10.4f}   (the floor: {result['n_real_held_out']} images)")
    print(f"  untrained generator  {result['fid_untrained']:10.4f}   (the ceiling: same seed and architecture)")
    if "label_accuracy" in result:
        print(f"  label accuracy       {result['label_accuracy']:10.4f}   (the classifier agrees with the requested class)")
        print("  per class: " + "  ".join(f"{k} {v:.3f}" for k, v in result["label_accuracy_per_class"].items()))
    print(f"  skipped files        {result['skipped_files']:10d}   (broken files in DATA)")
    return 0


def register(commands) -> dict:
    """Add `gan` and its sub-verbs to the CLI; returns {verb: handler}."""
    gan = commands.add_parser("gan", help="generate images: train a DCGAN, sample it, measure it (domain FID)")
    verbs = gan.add_subparsers(dest="gan_command", required=True)

    p = verbs.add_parser("train", help="train a DCGAN on DATA")
    p.add_argument("data", help="image DATA (its training part): class folders, train/+val/ or train/+test/ folders, an MNIST folder, digits")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 20; with --resume: extend to this many)")
    p.add_argument("--conditional", action="store_true", help="condition both networks on the class label")
    add_shape_options(p, size_help="4-8 times a power of two up to 512, e.g. 28, 32, 64")
    p.add_argument("--loss", default=GanConfig.loss, choices=GAN_LOSSES, help="ns: non-saturating (default), hinge")
    p.add_argument("--spectral-norm", action="store_true", help="spectral normalisation on the discriminator")
    p.add_argument("--no-minibatch-std", action="store_true",
                   help="leave out the discriminator's minibatch standard deviation channel (on by default)")
    p.add_argument("--mode-seeking", type=float, default=GanConfig.mode_seeking,
                   help="--conditional only: weight of the mode-seeking term that keeps samples of one class apart (0 = off)")
    p.add_argument("--batch-size", type=int, default=GanConfig.batch_size)
    p.add_argument("--lr", type=float, default=GanConfig.lr)
    add_run_options(p)
    p.set_defaults(**{name: None for name in GAN_FLAGS})  # the defaults above are GanConfig's own

    p = verbs.add_parser("sample", help="write N generated images: one grid (.png, .jpg, ...) or a folder of PNGs")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True,
                   help="grid.png (or .jpg, .webp, ...; replaced if it exists), or a folder for one PNG per image "
                        "(refused if it holds files of the same names)")
    p.add_argument("--label", default=None, help="conditional GANs: the class to generate (default: every class)")
    p.add_argument("--seed", type=int, default=0)
    add_device_option(p)

    p = verbs.add_parser("evaluate", help="domain FID against DATA, beside the real-data floor and the untrained ceiling")
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--classifier", default=None,
                   help="a visionflow classifier run on the same data (default: train one once into RUN_DIR/classifier)")
    p.add_argument("--n", type=int, default=2000,
                   help="generated samples (default 2000; at or below the features' dimensions, 64 for the run's own "
                        "classifier, the FID is unreliable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_device_option(p)
    p.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    handlers = {"train": run_gan_train, "sample": run_gan_sample, "evaluate": run_gan_evaluate}
    return {"gan": lambda args: handlers[args.gan_command](args)}
