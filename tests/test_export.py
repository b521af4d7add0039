"""ONNX export and the ONNX Runtime engine: the same predictions as the PyTorch path."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from visionflow import api
from visionflow.cli import main
from visionflow.config import TrainConfig
from visionflow.data.loading import decode_part
from visionflow.data.sources import open_data
from visionflow.data.transforms import Preprocess
from visionflow.infer.export import export_model_onnx
from visionflow.devices import cpu_has_native_bf16, resolve_precision, select_device
from visionflow.errors import VisionflowError
from visionflow.infer.onnx_engine import OnnxRuntimeModel
from visionflow.infer.predictor import Predictor
from visionflow.models import create_model, list_models, model_entry
from visionflow.runs import RunDir

from conftest import SHARED_DATASETS



@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    api.train(TrainConfig(data="digits", out=str(out), model="seed-cnn", epochs=1, seed=0), show_progress=False)
    return out


def _small_predictor(name: str) -> Predictor:
    """An untrained model of each registered family at a small input, with a non-trivial preprocessing."""
    kind = model_entry(name).input_kind
    channels, size = (1, 28) if kind == "image" else (3, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=channels, image_size=size).eval()
    preprocess = Preprocess(image_size=size, channels=channels, mean=[0.3] * channels, std=[0.2] * channels)
    return Predictor(model, preprocess, [str(i) for i in range(5)], torch.device("cpu"), input_kind=kind, frames=4,
                     precision="fp32")


def _random_inputs(predictor: Predictor, n: int) -> torch.Tensor:
    p = predictor.preprocess
    shape = (n, p.channels, p.image_size, p.image_size)
    if predictor.input_kind == "clip":
        shape = (n, predictor.frames, *shape[1:])
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_fp32_parity(name, tmp_path):
    torch_predictor = _small_predictor(name)
    path = export_model_onnx(torch_predictor, tmp_path / f"{name}.onnx", digest="-")
    onnx_predictor = Predictor(OnnxRuntimeModel(str(path)), torch_predictor.preprocess, torch_predictor.classes,
                               torch.device("cpu"), input_kind=torch_predictor.input_kind, frames=torch_predictor.frames)
    images = _random_inputs(torch_predictor, 7)  # an odd batch: the batch axis is dynamic
    expected = torch_predictor.probabilities(images, batch_size=4)
    got = onnx_predictor.probabilities(images, batch_size=4)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_export_cli_writes_a_file_that_records_the_preprocessing(digits_run, tmp_path, capsys):
    import onnx

    out = tmp_path / "digits.onnx"
    assert main(["export", str(digits_run), "--format", "onnx", "--out", str(out)]) == 0
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    config = json.loads((digits_run / "config.json").read_text())
    assert json.loads(metadata["visionflow.classes"]) == config["classes"]
    assert json.loads(metadata["visionflow.preprocess"]) == config["preprocess"]


def test_onnx_engine_evaluates_digits_like_torch(digits_run):
    torch_metrics = api.evaluate(str(digits_run), "digits", engine="torch", precision="fp32")
    onnx_metrics = api.evaluate(str(digits_run), "digits", engine="onnx")
    assert (digits_run / "best.onnx").exists()  # exported on first use, beside the weights
    assert onnx_metrics["n"] == torch_metrics["n"]
    assert onnx_metrics["accuracy"] == pytest.approx(torch_metrics["accuracy"], abs=1.0 / torch_metrics["n"])


def test_onnx_sessions_follow_torch_threads_and_do_not_spin(digits_run):
    model = Predictor.from_run(str(digits_run), engine="onnx").model  # exports best.onnx if it is not there
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnx_engine_predicts_the_same_rows(digits_run, tmp_path):
    from PIL import Image

    images = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).save(tmp_path / f"{i}.png")
    torch_rows = list(api.predict(str(digits_run), [str(tmp_path)], top_k=3, engine="torch", precision="fp32"))
    onnx_rows = list(api.predict(str(digits_run), [str(tmp_path)], top_k=3, engine="onnx"))
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    # one path, as a string or a pathlib path, is one input (not a sequence of its characters)
    for one in (str(tmp_path / "1.png"), tmp_path / "1.png"):
        rows = list(api.predict(str(digits_run), one, top_k=3, engine="torch", precision="fp32"))
        assert [r["path"] for r in rows] == [str(tmp_path / "1.png")] and rows[0]["label"] == torch_rows[1]["label"]


def test_unknown_engine_and_format_are_one_line_errors(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "digits", "--engine", "tensorrt"]) == 2
    assert main(["export", str(digits_run), "--format", "tflite"]) == 2
    assert "tflite" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATASETS / "mnist").is_dir(), reason="the shared MNIST data is not on this machine")
def test_onnx_parity_on_real_mnist_images(digits_run):
    """The acceptance check in small: real MNIST digits through both engines."""
    from visionflow.data.loading import decode_part
    from visionflow.data.sources import open_data

    source = open_data(str(SHARED_DATASETS / "mnist")).train
    torch_predictor = Predictor.from_run(str(digits_run), precision="fp32")
    part = decode_part(source.subset(range(500)), 1, torch_predictor.preprocess.image_size)
    onnx_predictor = Predictor.from_run(str(digits_run), engine="onnx")
    expected, got = torch_predictor.probabilities(part.images), onnx_predictor.probabilities(part.images)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999
    assert (got - expected).abs().max() < 1e-4


def test_auto_engine_is_onnx_for_fp32_on_the_cpu_and_torch_for_bf16_or_when_asked(digits_run):
    from visionflow.infer.onnx_engine import OnnxRuntimeModel

    fp32 = Predictor.from_run(str(digits_run), device="cpu", engine="auto", precision="fp32")
    assert isinstance(fp32.model, OnnxRuntimeModel) and fp32.precision == "fp32"
    bf16 = Predictor.from_run(str(digits_run), device="cpu", engine="auto", precision="bf16")
    assert not isinstance(bf16.model, OnnxRuntimeModel) and bf16.precision == "bf16"
    auto = Predictor.from_run(str(digits_run), device="cpu", engine="auto")
    assert isinstance(auto.model, OnnxRuntimeModel) != cpu_has_native_bf16()
    assert not isinstance(Predictor.from_run(str(digits_run)).model, OnnxRuntimeModel)  # the nn.Module, for features
    with pytest.raises(VisionflowError, match="--engine onnx runs the fp32 export"):  # not bf16 dropped unsaid
        Predictor.from_run(str(digits_run), engine="onnx", precision="bf16")


def test_auto_engine_keeps_recurrent_models_on_torch(tmp_path):
    """ONNX Runtime's RNN kernels labelled seed-rnn 4x slower than PyTorch: auto never picks them."""
    from visionflow.infer.onnx_engine import OnnxRuntimeModel

    out = tmp_path / "rnn"
    api.train(TrainConfig(data="digits", out=str(out), model="seed-rnn", epochs=1, seed=0), show_progress=False)
    predictor = Predictor.from_run(str(out), device="cpu", engine="auto", precision="fp32")
    assert not isinstance(predictor.model, OnnxRuntimeModel) and predictor.precision == "fp32"
    assert isinstance(Predictor.from_run(str(out), engine="onnx").model, OnnxRuntimeModel)  # still there when asked


def test_bf16_labels_digits_like_fp32(digits_run):
    """bf16 autocast (the default where the CPU computes bf16) against fp32 on the same 1,797 digits: the
    probabilities move by bf16's rounding, not enough to change more than a handful of top-1 labels."""
    from visionflow.data.loading import decode_part
    from visionflow.data.sources import open_data

    fp32 = Predictor.from_run(str(digits_run), engine="torch", precision="fp32")
    bf16 = Predictor.from_run(str(digits_run), engine="torch", precision="bf16")
    part = decode_part(open_data("digits").train, 1, fp32.preprocess.image_size)
    expected, got = fp32.probabilities(part.images), bf16.probabilities(part.images)
    assert 0 < (got - expected).abs().max() < 0.05  # > 0: bf16 really ran
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.995


def test_precision_auto_follows_the_hardware_and_bad_values_are_one_line_errors(digits_run, capsys):
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu, nn.Conv2d(1, 1, 3)) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", cpu, nn.GRU(4, 4)) == "fp32"  # recurrent layers stay fp32 on the CPU
    assert main(["evaluate", str(digits_run), "digits", "--precision", "fp16"]) == 2
    assert "--precision" in capsys.readouterr().err


def test_auto_engine_falls_back_to_torch_when_the_export_cannot_be_written(digits_run, tmp_path, caplog):
    import logging
    import shutil

    from visionflow.infer.onnx_engine import OnnxRuntimeModel

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    for stale in run.glob("*.onnx"):
        stale.unlink()
    (run / "best.onnx").mkdir()  # a folder where the export would go: it cannot be written
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        predictor = Predictor.from_run(str(run), engine="auto", precision="fp32")
    assert not isinstance(predictor.model, OnnxRuntimeModel)
    assert "ONNX engine is unavailable" in caplog.text
    assert main(["evaluate", str(run), "digits", "--engine", "onnx"]) == 2  # asked for explicitly: an error, not a fallback


def test_evaluate_and_predict_say_which_engine_and_precision_labelled(digits_run, tmp_path, capsys):
    import shutil

    from PIL import Image

    def ran(argv: list[str]) -> tuple[str, str]:
        assert main(argv) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err.strip().splitlines()[-1]

    out, said = ran(["evaluate", str(digits_run), "digits", "--json", "--engine", "onnx"])
    assert said == "engine onnx, fp32, cpu"
    assert {key: json.loads(out)[key] for key in ("engine", "precision", "device")} == {
        "engine": "onnx", "precision": "fp32", "device": "cpu"}
    out, said = ran(["evaluate", str(digits_run), "digits", "--json", "--engine", "torch", "--precision", "bf16"])
    assert said == "engine torch, bf16, cpu" and json.loads(out)["precision"] == "bf16"
    Image.new("L", (28, 28)).save(tmp_path / "blank.png")
    assert ran(["predict", str(digits_run), str(tmp_path / "blank.png"), "--precision", "fp32"])[1] == "engine onnx, fp32, cpu"
    # where auto falls back from ONNX Runtime, the line says what really ran
    run = shutil.copytree(digits_run, tmp_path / "run")
    for stale in run.glob("*.onnx"):
        stale.unlink()
    (run / "best.onnx").mkdir()  # the export cannot be written
    assert ran(["predict", str(run), str(tmp_path / "blank.png"), "--precision", "fp32"])[1] == "engine torch, fp32, cpu"


def test_the_cached_graph_is_used_only_for_the_weights_it_holds(digits_run, tmp_path):
    """A graph cached in the run folder says which weights it holds; other weights are exported anew, whatever the
    files' times (a copy keeps its old time), and so is a graph from elsewhere or a damaged one."""
    import os
    import shutil

    import onnx as onnx_format

    from visionflow.infer.export import WEIGHTS_KEY, weights_digest

    run = RunDir(shutil.copytree(digits_run, tmp_path / "run"))
    images = decode_part(open_data("digits").train, 1, 28).images[:64]

    def onnx_and_torch() -> tuple[torch.Tensor, torch.Tensor]:
        onnx = Predictor.from_run(str(run.path), engine="onnx", weights="last").probabilities(images)
        return onnx, Predictor.from_run(str(run.path), engine="torch", precision="fp32", weights="last").probabilities(images)

    onnx, reference = onnx_and_torch()  # exports last.onnx
    assert (onnx - reference).abs().max() < 1e-4
    exported = os.stat(run / "last.onnx").st_mtime_ns
    Predictor.from_run(str(run.path), engine="onnx", weights="last")
    assert os.stat(run / "last.onnx").st_mtime_ns == exported  # the same weights: the cached graph is used
    graph_of_other_weights = (run / "last.onnx").read_bytes()
    old_time = os.stat(run / "last.onnx").st_mtime - 60
    weights = run.load_weights("last.safetensors")
    run.save_weights("last.safetensors", {k: v * 0.5 if v.is_floating_point() else v for k, v in weights.items()})
    os.utime(run / "last.safetensors", (old_time, old_time))  # older than the cached graph, as after `cp -p`
    onnx, reference = onnx_and_torch()
    assert (onnx - reference).abs().max() < 1e-4  # the new weights' graph, not the cached one
    metadata = {p.key: p.value for p in onnx_format.load(str(run / "last.onnx")).metadata_props}
    assert metadata[WEIGHTS_KEY] == weights_digest(run / "last.safetensors")
    (run / "last.onnx").write_bytes(graph_of_other_weights)  # newer than the weights, as a graph copied in
    onnx, reference = onnx_and_torch()
    assert (onnx - reference).abs().max() < 1e-4
    (run / "last.onnx").write_bytes(b"damaged")
    onnx, reference = onnx_and_torch()
    assert (onnx - reference).abs().max() < 1e-4


def test_tied_scores_label_an_image_as_evaluate_counts_it():
    """bf16 logits tie now and then: predict's label must be the class evaluate's argmax scores."""
    class Tied(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0, 2.0]).expand(len(x), 6)

    predictor = Predictor(Tied(), Preprocess(image_size=8, channels=1, mean=[0.0], std=[1.0]), list("abcdef"),
                          torch.device("cpu"), precision="fp32")
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    scores, indices = predictor.top_k(images, k=4)
    assert indices.tolist() == [[1, 3, 4, 5]] * 64
    assert torch.equal(indices[:, 0], predictor.logits(images).argmax(1))
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


@pytest.mark.parametrize("images", [
    torch.zeros(2, 3, 28, 28, dtype=torch.uint8),   # colour into a grey model: the C kernel read past its weights
    torch.zeros(2, 1, 32, 32, dtype=torch.uint8),   # another size
    torch.zeros(2, 28, 28, 1, dtype=torch.uint8),   # channels last as an array
    torch.rand(2, 1, 28, 28),                       # floats in [0, 1], which would be read as 0..255
])
def test_a_tensor_the_model_was_not_trained_on_is_refused(digits_run, images):
    predictor = Predictor.from_run(str(digits_run))
    with pytest.raises(VisionflowError, match=r"labels uint8 \(N, C, H, W\) images with C=1 and H=W=28"):
        predictor.logits(images)


def test_the_c_kernel_is_not_given_an_input_of_other_channels_than_its_weights():
    from visionflow.models.conv_pool import kernel_applies, kernel_runs_here

    conv = nn.Conv2d(1, 32, 3)
    grey = torch.zeros(2, 1, 12, 12)
    if not kernel_runs_here(grey):
        pytest.skip("the C kernel is not built here (no compiler)")
    assert kernel_applies(grey, conv) is True  # its own channel count
    assert kernel_applies(torch.zeros(2, 3, 12, 12), conv) is False


def test_a_precision_that_does_not_exist_is_refused_for_recurrent_models_too(tmp_path):
    out = tmp_path / "rnn"
    api.train(TrainConfig(data="digits", out=str(out), model="seed-rnn", epochs=1), show_progress=False)
    for engine in ("torch", "onnx", "auto"):
        with pytest.raises(VisionflowError, match="--precision must be one of"):
            Predictor.from_run(str(out), engine=engine, precision="fp16")


class FakeGpus:
    """torch.cuda as a machine with GPUs would answer, for the device rules alone: `native` says which GPUs compute
    bf16 in hardware; `is_bf16_supported` answers for the current one, emulation counted only when asked."""

    def __init__(self, native: list[bool]):
        self.native, self.current = native, 0

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return including_emulation or self.native[self.current]

    @contextlib.contextmanager
    def device(self, device: torch.device):
        before, self.current = self.current, device.index or 0
        yield
        self.current = before


def test_auto_precision_takes_bf16_only_on_gpus_that_compute_it_and_never_for_recurrent_models(monkeypatch):
    gpus = FakeGpus(native=[True, False])  # an A100 and a T4, which only emulates bf16 (slower than fp32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpus.is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", gpus.device)
    conv = nn.Conv2d(1, 1, 3)
    assert resolve_precision("auto", torch.device("cuda:0"), conv) == "bf16"
    assert resolve_precision("auto", torch.device("cuda:1"), conv) == "fp32"  # asked of cuda:1, not the current GPU
    assert resolve_precision("auto", torch.device("cuda:0"), nn.LSTM(4, 4)) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda:1"), conv) == "bf16"  # asked for: taken as given


def test_a_gpu_number_beyond_the_machines_gpus_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda:1") and select_device("cuda") == torch.device("cuda")
    with pytest.raises(VisionflowError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        select_device("cuda:2")
