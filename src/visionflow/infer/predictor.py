"""The predictor: one object that turns decoded uint8 images into class probabilities.

The CLI's `predict` and `evaluate`, validation during training and the GAN's feature classifier all call it, so
every path applies exactly the preprocessing recorded in the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from visionflow.config import EVAL_AUGMENTS, PRECISIONS
from visionflow.data.transforms import Preprocess, warn_of_mirrored_side
from visionflow.devices import autocast, is_recurrent, memory_format, resolve_precision, select_device
from visionflow.errors import VisionflowError
from visionflow.models import create_model
from visionflow.runs import RunDir

log = logging.getLogger("visionflow")

ENGINES = ("auto", "torch", "onnx")


def load_run_model(run: RunDir, weights: str = "best") -> tuple[nn.Module, dict]:
    """(the run's model with its weights, on the CPU in eval mode; the other Predictor fields)."""
    config = run.require()
    missing = [key for key in ("train", "classes", "preprocess") if key not in config]
    if missing:  # edited by hand, or another tool's file
        raise VisionflowError(f"{run.path / 'config.json'}: no {', '.join(missing)} (not a classifier run's config)")
    train = config["train"]
    preprocess = Preprocess(**config["preprocess"])
    name = {"best": run.best_weights_name(), "last": "last.safetensors"}.get(weights)
    if name is None:
        raise VisionflowError(f"--weights must be best or last (got {weights})")
    model = run.load_network(lambda: create_model(train["model"], num_classes=len(config["classes"]),
                                                  in_channels=preprocess.channels, image_size=preprocess.image_size,
                                                  **train.get("model_options", {})), name)
    fields = {"preprocess": preprocess, "classes": list(config["classes"]),
              "input_kind": config.get("input_kind", "image"), "frames": int(train.get("frames", 16)),
              "augment_eval": config.get("augment_eval", "none")}
    return model.eval(), fields


def warn_of_test_time_mirrors(augment_eval: str, classes: list[str], recorded: bool = False) -> None:
    """Test-time augmentation averages each image's logits with its mirror's (every view but "none" is flipped left to
    right too, Predictor._test_time_augmented): a warning, once before the work, when a class is named after a side
    the mirror swaps, as for training's --augment flip. `recorded`: the run's own, the command asking for no other."""
    if augment_eval != "none":
        option = f"--augment-eval {augment_eval}"
        warn_of_mirrored_side(f"the run's {option}" if recorded else option, "flip", classes, "each image's logits "
                              "are averaged with its mirror's, which shows the other side (use --augment-eval none)")


@dataclass
class Predictor:
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    device: torch.device
    input_kind: str = "image"
    frames: int = 16
    augment_eval: str = "none"  # "flip": logits are the mean over the image and its mirror (test-time augmentation)
    precision: str = "auto"     # torch engine: "auto" is resolved on construction to fp32 or bf16 (devices.resolve_precision)
    engine: str = "torch"       # what runs the model: "torch", or "onnx" (ONNX Runtime, fp32 on the CPU)

    def __post_init__(self):
        self.precision = resolve_precision(self.precision, self.device, self.model)

    @classmethod
    def from_run(cls, run_dir: str | RunDir, device: str = "auto", weights: str = "best",
                 engine: str = "torch", precision: str = "auto", augment_eval: str | None = None) -> "Predictor":
        """The run's model with its recorded preprocessing, run by PyTorch or by ONNX Runtime (CPU only).

        engine "auto": PyTorch where it runs bf16 (a GPU, or a CPU with native bf16: there channels-last bf16
        labelled seed-cnn at 32,500 img/s against ONNX Runtime's 11,700 in fp32); otherwise ONNX Runtime for
        convolutional image models on the CPU, where it labelled 2-3x faster than eager fp32 PyTorch on the AVX2
        CPU it was measured on, with the same top-1 and probabilities within 1e-4 (tests/test_export.py).
        PyTorch for recurrent models (seed-rnn: 356,000 img/s against ONNX Runtime's 85,000), for clips, and
        when the export or ONNX Runtime is unavailable (with a warning saying why). `precision` applies to the PyTorch engine only: ONNX
        Runtime runs the exported fp32 graph. `augment_eval` overrides the test-time augmentation the run
        recorded (None keeps it). `evaluate`
        and `predict` ask for "auto"; the default stays "torch" for callers that need the nn.Module itself
        (the GAN's domain-FID features).
        """
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        model, fields = load_run_model(run, weights)  # first: a missing or wrong run is said before a bad option
        if engine not in ENGINES:
            raise VisionflowError(f"--engine must be one of {', '.join(ENGINES)} (got {engine})")
        if precision not in PRECISIONS:  # checked here for every model: resolve_precision is not reached for all
            raise VisionflowError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision})")
        if augment_eval is not None:
            if augment_eval not in EVAL_AUGMENTS:
                raise VisionflowError(f"--augment-eval must be one of {', '.join(EVAL_AUGMENTS)} (got {augment_eval})")
            fields["augment_eval"] = augment_eval
        if engine == "onnx" and precision == "bf16":
            raise VisionflowError("--engine onnx runs the fp32 export; bf16 needs --engine torch (or auto)")
        target = select_device(device)
        # auto leaves clip models to PyTorch: their exported graph is fixed to the run's frames per clip.
        onnx_first = (target.type == "cpu" and fields["input_kind"] == "image" and not is_recurrent(model)
                      and resolve_precision(precision, target, model) == "fp32")
        if engine == "onnx" or (engine == "auto" and onnx_first):
            from visionflow.infer.onnx_engine import onnx_runtime_model

            try:
                return cls(onnx_runtime_model(run, weights, cls(model, device=torch.device("cpu"), **fields)),
                           device=torch.device("cpu"), precision="fp32", engine="onnx", **fields)
            except (VisionflowError, OSError, ImportError) as exc:
                if engine == "onnx":
                    raise
                log.warning("labelling with PyTorch: the ONNX engine is unavailable (%s)", exc)
        model.to(target, memory_format=memory_format(target))
        return cls(model, device=target, precision=precision, **fields)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images (N, C, H, W) or clips (N, T, C, H, W) -> logits (N, classes), float32 on the CPU."""
        self.check_input(images)
        outputs = []
        # One autocast region for all batches: its cache keeps the bf16 copies of the weights from one batch
        # to the next instead of casting them again for each.
        with autocast(self.device, self.precision):
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(self.device, non_blocking=True)
                x = self.preprocess(batch)
                if x.ndim == 4:
                    x = x.contiguous(memory_format=memory_format(self.device))
                outputs.append(self._test_time_augmented(x).cpu())
        if not outputs:
            return torch.empty(0, len(self.classes))
        return torch.cat(outputs)

    def check_input(self, images: torch.Tensor) -> None:
        """A one-line error for a tensor the model was not trained on, rather than logits from the wrong channels or
        from floats read as 0..255."""
        p = self.preprocess
        layout = "(N, T, C, H, W) clips" if self.input_kind == "clip" else "(N, C, H, W) images"
        if (images.dtype != torch.uint8 or images.ndim != (5 if self.input_kind == "clip" else 4)
                or images.shape[-3] != p.channels or tuple(images.shape[-2:]) != (p.image_size, p.image_size)):
            raise VisionflowError(f"the run labels uint8 {layout} with C={p.channels} and H=W={p.image_size} "
                                  f"(got {images.dtype} {tuple(images.shape)})")

    def _test_time_augmented(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over the views `augment_eval` names. "flip": the image and its mirror.
        "flip-translate" (airbench's level-2 TTA, 6 passes): half that, half the same for the image shifted one
        pixel up-left and one pixel down-right with reflected borders."""
        def flip_mean(view: torch.Tensor) -> torch.Tensor:
            return (self.model(view).float() + self.model(view.flip(-1)).float()) / 2

        if self.augment_eval == "none":
            return self.model(x).float()
        logits = flip_mean(x)
        if self.augment_eval == "flip-translate":
            height, width = x.shape[-2:]
            padded = F.pad(x.flatten(0, -4), (1, 1, 1, 1), mode="reflect").view(*x.shape[:-2], height + 2, width + 2)
            shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
            logits = (logits + sum(flip_mean(view.contiguous(memory_format=memory_format(self.device))
                                             if view.ndim == 4 else view) for view in shifted) / 2) / 2
        return logits

    def probabilities(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.softmax(self.logits(images, batch_size), dim=1)

    def top_k(self, images: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, class indices), each (N, k), best first."""
        probs = self.probabilities(images)
        # A stable sort: of equal scores (bf16 logits tie now and then) the lower class comes first, as with the
        # argmax `evaluate` scores by; topk leaves the order of ties open.
        indices = probs.argsort(dim=1, descending=True, stable=True)[:, :min(k, probs.shape[1])]
        return probs.gather(1, indices), indices
