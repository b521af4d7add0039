"""Export a run's model to ONNX, for ONNX Runtime here (`--engine onnx`) or any other ONNX consumer.

The graph takes the *preprocessed* float batch (what `Preprocess` returns) and gives logits, with a
dynamic batch axis. The recorded preprocessing (size, channels, mean, std), the class names and the
sha256 of the weights it holds travel in the file's metadata, so the file alone says how to feed it; inside visionflow the
ONNX engine applies the run's own `Preprocess`, the same code the PyTorch path runs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from visionflow.errors import VisionflowError
from visionflow.infer.predictor import Predictor, load_run_model
from visionflow.runs import RunDir, atomic_write, check_output_file

FORMATS = ("onnx",)
OPSET = 17  # supported by every ONNX Runtime release of the last few years


def default_onnx_path(run: RunDir, weights: str) -> Path:
    """RUN_DIR/best.onnx or RUN_DIR/last.onnx, beside the weights they come from."""
    return run / f"{weights}.onnx"


def weights_file(run: RunDir, weights: str) -> Path:
    return run / (run.best_weights_name() if weights == "best" else "last.safetensors")


def weights_digest(path: Path) -> str:
    """sha256 of a weights file: the exported graph records it, so a cached graph of other weights is never used
    (times are no proof: a copy keeps its old one, a coarse filesystem gives two files the same)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def example_input(predictor: Predictor, batch: int = 2) -> torch.Tensor:
    """A preprocessed batch of the run's shape: (N, C, H, W), or (N, T, C, H, W) for clip models."""
    p = predictor.preprocess
    shape = (batch, p.channels, p.image_size, p.image_size)
    if predictor.input_kind == "clip":
        shape = (batch, predictor.frames, *shape[1:])
    return torch.zeros(shape, dtype=torch.float32)


def export_model_onnx(predictor: Predictor, path: Path, digest: str) -> Path:
    """Write `predictor.model` as ONNX (fp32, dynamic batch) with the preprocessing and `digest` (weights_digest of
    the weights it holds) in its metadata."""
    model = predictor.model.to("cpu").eval()
    model = model.to(memory_format=torch.contiguous_format)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is the one that needs no extra package (the dynamo one
            # needs onnxscript); torch announces its deprecation on every call.
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input(predictor),), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        _add_metadata(tmp, predictor, digest)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise VisionflowError(f"{path}: cannot write the ONNX file ({exc.strerror or exc})") from None
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise VisionflowError(f"ONNX export of this model failed: {str(exc).splitlines()[0]}") from None
    return path


WEIGHTS_KEY = "visionflow.weights_sha256"


def _add_metadata(path: str, predictor: Predictor, digest: str) -> None:
    import onnx

    model = onnx.load(path)
    values = {"visionflow.classes": json.dumps(predictor.classes),
              "visionflow.preprocess": json.dumps(predictor.preprocess.to_dict()),
              "visionflow.input_kind": predictor.input_kind,
              "visionflow.input": "float32, preprocessed: (uint8 / 255 - mean) / std",
              WEIGHTS_KEY: digest}
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def export_run(run_dir: str, fmt: str = "onnx", out: str | None = None, weights: str = "best") -> Path:
    """Export a run's weights; returns the written file (default RUN_DIR/best.onnx)."""
    if fmt not in FORMATS:
        raise VisionflowError(f"--format must be one of {', '.join(FORMATS)} (got {fmt})")
    run = RunDir(run_dir)
    if out is not None:
        check_output_file(Path(out), "--out")  # before the run is loaded and traced
    model, predictor_fields = load_run_model(run, weights)
    predictor = Predictor(model, device=torch.device("cpu"), **predictor_fields)
    return export_model_onnx(predictor, Path(out) if out else default_onnx_path(run, weights),
                             weights_digest(weights_file(run, weights)))
