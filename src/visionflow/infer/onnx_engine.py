"""The ONNX Runtime engine: the run's exported graph behind the ordinary `Predictor`.

`OnnxRuntimeModel` is an `nn.Module` whose forward runs an ONNX Runtime session, so `Predictor` (and
everything that calls it: evaluate, predict) works unchanged with `--engine onnx`, applying
the run's own recorded `Preprocess` before the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.errors import VisionflowError
from visionflow.infer.export import WEIGHTS_KEY, default_onnx_path, export_model_onnx, weights_digest, weights_file
from visionflow.infer.predictor import Predictor
from visionflow.runs import RunDir


class OnnxRuntimeModel(nn.Module):
    """float batch -> logits through an ONNX Runtime CPU session (fp32, as exported)."""

    def __init__(self, path: str, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise VisionflowError("--engine onnx needs the onnxruntime package (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Share the cores the way torch does, so the two engines compare on the same footing.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # ONNX Runtime's threads spin between runs by default, and take the cores from the torch code that
        # prepares the next batch: turning it off labelled the MNIST split at 16,857-18,090 img/s against
        # 9,602-13,048 (seed-cnn, batch 256, three alternating pairs of processes).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise VisionflowError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def onnx_runtime_model(run: RunDir, weights: str, torch_predictor: Predictor) -> OnnxRuntimeModel:
    """The run's ONNX graph (RUN_DIR/best.onnx or last.onnx), exported again unless the cached one says it holds
    these weights (the sha256 in its metadata): missing, damaged, of other weights or from elsewhere."""
    path = default_onnx_path(run, weights)
    digest = weights_digest(weights_file(run, weights))
    if path.exists():
        try:
            cached = OnnxRuntimeModel(str(path))
            if cached.metadata.get(WEIGHTS_KEY) == digest:
                return cached
        except VisionflowError:
            pass  # damaged: written anew below
    export_model_onnx(torch_predictor, path, digest)
    return OnnxRuntimeModel(str(path))
