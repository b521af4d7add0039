"""Each speed trick on its own: milliseconds per training step of seed-cnn at batch 32, and prediction rates.

    .venv/bin/python benchmarks/speed_paths.py [--steps 200] [--rounds 3] [--compile] [--threads N]

Every variant runs the same steps on the same random MNIST-sized batches; variants take turns for
`--rounds` rounds (so a change in the machine's load hits them all) and the median round is reported.
This is how the defaults in visionflow.devices and train/classifier.py were chosen; rerun it on a new machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from visionflow.config import TrainConfig
from visionflow.devices import compiled_or_eager
from visionflow.models import create_model
from visionflow.train.classifier import build_optimizer


def training_variant(fused: bool, channels_last: bool, compiled: bool, fast_path: bool = False):
    torch.manual_seed(0)
    model = create_model("seed-cnn", num_classes=10, in_channels=1, image_size=28)
    model.fast_path = fast_path
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = build_optimizer(TrainConfig(data="-", out="-"), model, fused=fused)
    forward = compiled_or_eager(model, torch.device("cpu"), enabled=compiled)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(forward(x.contiguous(memory_format=layout)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_steps(step, batches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to warm up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(50)]
    variants = {
        "eager, Adam foreach (plain torch)": dict(fused=False, channels_last=False, compiled=False),
        "+ fused Adam": dict(fused=True, channels_last=False, compiled=False),
        "+ channels-last": dict(fused=False, channels_last=True, compiled=False),
        "+ conv/pool/ReLU kernel (models/conv_pool.c)": dict(fused=False, channels_last=False, compiled=False,
                                                           fast_path=True),
        "all three (visionflow's default, in fp32)": dict(fused=True, channels_last=True, compiled=False,
                                                        fast_path=True),
    }
    if args.compile:
        variants["+ torch.compile (--compile)"] = dict(fused=False, channels_last=False, compiled=True)
    steps = {name: training_variant(**options) for name, options in variants.items()}
    print(f"seed-cnn training step, batch 32, {torch.get_num_threads()} threads, median of {args.rounds} rounds", flush=True)
    for step in steps.values():
        time_steps(step, batches, 30)  # warm-up: allocator, oneDNN primitives, compilation
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, batches, args.steps))
    base = statistics.median(times[next(iter(times))])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"  {name:<46}{ms:8.2f} ms/step {32000 / ms:9,.0f} img/s {base / ms:6.2f}x")

    torch.manual_seed(0)
    model = create_model("seed-cnn", num_classes=10, in_channels=1, image_size=28).eval()
    images = torch.randn(2048, 1, 28, 28)
    print("seed-cnn prediction, 2,048 images")
    for batch in (32, 256, 1024):
        for mode_name, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            rates = []
            for _ in range(args.rounds):
                with mode():
                    start = time.perf_counter()
                    for first in range(0, len(images), batch):
                        model(images[first:first + batch])
                    rates.append(len(images) / (time.perf_counter() - start))
            print(f"  batch {batch:<5} {mode_name:<16}{statistics.median(rates):10,.0f} img/s")


if __name__ == "__main__":
    main()
