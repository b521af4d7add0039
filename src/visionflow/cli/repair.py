"""CLI verbs for image repair (inpainting): `repair train`, `repair run`, `repair evaluate`."""

from __future__ import annotations

import json

from visionflow.cli import none_succeeded
from visionflow.cli.options import (add_device_option, add_run_options, add_shape_options, given_flags,
                                    ignored_on_resume)
from visionflow.gan.losses import GAN_LOSSES
from visionflow.gan.repair import RepairConfig

# The `repair train` flags that set RepairConfig fields. They parse as None unless given, so RepairConfig's defaults
# apply and --resume can name the ones it ignores.
REPAIR_FLAGS = ("epochs", "image_size", "channels", "batch_size", "lr", "width", "hole_weight", "adversarial_weight",
                "gan_loss", "val_split", "max_images", "seed", "strict", "device")


def add_repair_parsers(commands) -> None:
    repair = commands.add_parser("repair", help="image repair (inpainting): train, run, evaluate against biharmonic")
    verbs = repair.add_subparsers(dest="repair_command", required=True, parser_class=type(repair))  # one-line usage errors here too

    p = verbs.add_parser("train", help="train a repair model (U-Net generator + PatchGAN) with random holes")
    p.add_argument("data", help="image DATA: class folders, train/+test/ folders, an MNIST folder, or a built-in name (digits)")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--epochs", type=int, default=None, help="default 10; with --resume: extend the run to this many")
    add_shape_options(p)
    p.add_argument("--batch-size", type=int, default=RepairConfig.batch_size)
    p.add_argument("--lr", type=float, default=RepairConfig.lr)
    p.add_argument("--width", type=int, default=RepairConfig.width, help="generator channels at full resolution")
    p.add_argument("--hole-weight", type=float, default=RepairConfig.hole_weight, help="L1 weight of hole pixels (known pixels: 1)")
    p.add_argument("--adversarial-weight", type=float, default=RepairConfig.adversarial_weight)
    p.add_argument("--gan-loss", default=RepairConfig.gan_loss, choices=GAN_LOSSES)
    p.add_argument("--val-split", type=float, default=RepairConfig.val_split, help="validation fraction held out of the training part")
    p.add_argument("--max-images", type=int, default=None, help="train on a seeded subset of this many images")
    add_run_options(p)
    p.set_defaults(**{name: None for name in REPAIR_FLAGS})  # the defaults above are RepairConfig's own

    p = verbs.add_parser("run", help="repair images: writes OUT/<name>_repaired.png and OUT/<name>_side_by_side.png "
                                      "(<number>_<name>_... when there are several)")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    hole = p.add_mutually_exclusive_group(required=True)
    hole.add_argument("--mask", help="a PNG of the image's size: white (>= 128) = missing pixels")
    hole.add_argument("--box", help="x,y,w,h: the missing rectangle, in pixels from the top-left corner (x, y of 0 or "
                                    "more)")
    p.add_argument("--out", required=True, help="output folder (files of the same names in it are replaced)")
    add_device_option(p)
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that is unreadable, or that the mask or box does not fit, instead of "
                        "skipping it")

    p = verbs.add_parser("evaluate", help="PSNR and SSIM of the model and of biharmonic inpainting on held-out images",
                         description="Scores the data's test part (else the run's held-out split) with the same masks "
                                     "for the model and for skimage.restoration.inpaint_biharmonic. PSNR "
                                     "(skimage.metrics.peak_signal_noise_ratio, data_range 255) and SSIM "
                                     "(skimage.metrics.structural_similarity, data_range 255, 7x7 window) are computed "
                                     "on the full uint8 images at the run's size (known pixels included) and averaged "
                                     "over images; an exactly repaired image (PSNR +inf) counts as 100 dB and is "
                                     "also counted under 'perfect'.")
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--mask", required=True, choices=("center", "random"),
                   help="center: a square hole in the middle; random: the training mix of blocks, rectangles and strokes")
    p.add_argument("--hole", type=int, default=None, help="side of the centre hole in pixels (default: half the image)")
    p.add_argument("--limit", type=int, default=None, help="score a seeded random subset of this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the random masks")
    p.add_argument("--examples", default=None,
                   help="also write a grid picture (.png, .jpg, ...; replaced if it exists): "
                        "damaged | biharmonic | model | original")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_device_option(p)
    p.add_argument("--strict", action="store_true", help="refuse broken files instead of skipping them")


def run_repair(args) -> int:
    from visionflow.api import repair as repair_api
    if args.repair_command == "train":
        if args.resume:
            report = repair_api.resume(args.out, epochs=args.epochs, show_progress=not args.quiet, data=args.data,
                                       device=args.device, flag_warnings=ignored_on_resume(args, REPAIR_FLAGS))
        else:
            cfg = RepairConfig(data=args.data, out=args.out, **given_flags(args, REPAIR_FLAGS))
            report = repair_api.train(cfg, show_progress=not args.quiet)
        print(f"{args.out}: best validation PSNR {report['best_val_psnr']:.2f} dB (epoch {report['best_epoch']} of "
              f"{report['epochs']}, {report['parameters']:,} generator parameters, {report['skipped_files']} skipped files)")
    elif args.repair_command == "run":
        rows = repair_api.run(args.run_dir, args.images, args.out, mask=args.mask, box=args.box, device=args.device,
                              strict=args.strict)
        for row in rows:
            if "error" not in row:  # a skipped image has had its warning
                print(f"{row['image']}: {row['repaired']}  {row['side_by_side']}  (hole {row['hole_fraction']:.1%})")
        if all("error" in row for row in rows):
            raise none_succeeded(len(rows), "image", "repaired", f"see the warning{'s' if len(rows) > 1 else ''} above")
    else:
        result = repair_api.evaluate(args.run_dir, args.data, mask=args.mask, hole=args.hole, limit=args.limit,
                                     seed=args.seed, examples=args.examples, device=args.device, strict=args.strict)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"n {result['n']}  mask {result['mask']}" + (f" {result['hole']}x{result['hole']}" if result["hole"] else ""))
        print(f"{'method':<12}{'PSNR dB':>10}{'SSIM':>10}{'perfect':>10}")
        for name in ("model", "biharmonic"):
            print(f"{name:<12}{result[name]['psnr']:>10.3f}{result[name]['ssim']:>10.4f}{result[name]['perfect']:>10}")
    return 0


def register(commands) -> dict:
    """Add this module's verbs to the CLI; returns {verb: handler}."""
    add_repair_parsers(commands)
    return {"repair": run_repair}
