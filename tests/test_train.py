"""The training loop: it learns, it resumes exactly, it handles imbalance, and its run directory is safe."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionflow import api
from visionflow.cli import main
from visionflow.config import TrainConfig
from visionflow.errors import VisionflowError
from visionflow.runs import RunDir, atomic_write
from visionflow.train.classifier import class_weights, epoch_order
from visionflow.train.metrics import classification_metrics

from conftest import run_with_stderr_on_a_terminal, write_class_folder


def test_seed_cnn_learns_digits(tmp_path: Path):
    report = api.train(TrainConfig(data="digits", out=str(tmp_path / "run"), epochs=3, lr=2e-3), show_progress=False)
    assert report["validation"]["accuracy"] > 0.9
    assert report["validation"]["n"] == 179  # 10% of each class held out
    run = RunDir(tmp_path / "run")
    for name in ("config.json", "split.json", "best.safetensors", "last.safetensors", "checkpoint.pt",
                 "metrics.csv", "report.json", "curves.png", "confusion.png"):
        assert run.exists(name), name
    assert [row["epoch"] for row in run.read_metrics()] == [1.0, 2.0, 3.0]
    # evaluate on the same data scores exactly the recorded held-out part, with the same result
    metrics = api.evaluate(str(tmp_path / "run"), "digits")
    assert metrics["n"] == 179 and metrics["accuracy"] == report["validation"]["accuracy"]
    assert report["validation_data"] == "10% of the training part, held out (split.json)"


def test_report_says_when_the_best_epoch_was_chosen_on_the_test_part(tmp_path: Path):
    data = tmp_path / "data"
    write_class_folder(data / "train", per_class=12)
    write_class_folder(data / "test", per_class=4, seed=1)
    report = api.train(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1), show_progress=False)
    assert report["validation"]["n"] == 12 and report["validation_data"] == "the data's test part"
    separate = api.train(TrainConfig(data=str(data / "train"), val=str(data / "test"), out=str(tmp_path / "run2"),
                                     epochs=1), show_progress=False)
    assert separate["validation"]["n"] == 12 and separate["validation_data"] == f"--val {data / 'test'}"


def test_the_same_seed_trains_the_same_weights_bit_for_bit(tmp_path: Path):
    # seed-cnn on 16x16 images: the C kernels and the Winograd block (in bf16 where the CPU has it) all run. A C
    # call once read a freed temporary copy of the channels-last weights, and one run in six diverged.
    data = write_class_folder(tmp_path / "patterns", per_class=30)
    weights = []
    for i in range(4):
        api.train(TrainConfig(data=str(data), out=str(tmp_path / f"run{i}"), epochs=2, lr=3e-3, val_split=0.2),
                  show_progress=False)
        weights.append(load_file(str(tmp_path / f"run{i}" / "last.safetensors")))
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[name], weights[0][name]) for name in weights[0])


def test_run_files_hold_no_code(tmp_path: Path):
    api.train(TrainConfig(data="digits", out=str(tmp_path / "run"), epochs=1), show_progress=False)
    weights = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert all(isinstance(t, torch.Tensor) for t in weights.values())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # would raise on pickled objects
    assert state["state"]["epoch"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave no temporaries
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # ordinary files others may read, the weights too


def train_command(data: str, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "visionflow", "--threads", "1", "train", data, "--out", str(out), "--epochs",
            str(epochs), "--augment", "rotate=10,shift=0.1", "--quiet", "--seed", "7"]


def interrupted_run(tmp_path: Path, name: str, epochs: int, signum: int) -> tuple[Path, str]:
    """A train run sent `signum` once its first epoch is saved: (its run directory, its stderr). On a crowded machine
    this process may be scheduled so late that the run has already finished (exit 0): then it tries again, afresh."""
    attempts = []  # (epochs saved when the signal went out, whether the run had already ended, exit code)
    for attempt in range(3):
        cut = tmp_path / f"{name}{attempt}"
        # A shell without job control starts background commands with SIGINT ignored, and a child inherits that
        # (Python then installs no KeyboardInterrupt handler): reset it, as a terminal's Ctrl-C would find it.
        process = subprocess.Popen(train_command("digits", cut, epochs), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not (cut / "metrics.csv").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        saved = len(RunDir(cut).read_metrics()) if (cut / "metrics.csv").exists() else 0
        ended = process.poll() is not None
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        attempts.append((saved, ended, process.returncode))
        if process.returncode != 0:
            break
    assert process.returncode == 130, (attempts, stderr)
    return cut, stderr


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path):
    epochs = 8
    whole = subprocess.run(train_command("digits", tmp_path / "whole", epochs), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    # Ctrl-C (SIGINT), and `kill` (SIGTERM), which stops training as Ctrl-C does: Python's default ended the process
    # at once, with no word of what was saved or how to continue it
    for name, signum in (("ctrl-c", signal.SIGINT), ("kill", signal.SIGTERM)):
        cut, stderr = interrupted_run(tmp_path, name, epochs, signum)
        assert 1 <= len(RunDir(cut).read_metrics()) < epochs
        assert re.fullmatch(rf"visionflow: interrupted after \d+ finished epoch\(s\), saved in {re.escape(str(cut))}; "
                            rf"continue with: visionflow train digits --out {re.escape(str(cut))} --resume",
                            stderr.splitlines()[-1]), (name, stderr)
        resumed = subprocess.run([sys.executable, "-m", "visionflow", "--threads", "1", "train", "digits", "--out",
                                  str(cut), "--resume", "--quiet"], capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        for weights in ("last.safetensors", "best.safetensors"):
            a, b = load_file(str(tmp_path / "whole" / weights)), load_file(str(cut / weights))
            assert all(torch.equal(a[k], b[k]) for k in a), (name, weights)
        measured = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not the time an epoch took
        assert ([[row[key] for key in measured] for row in RunDir(cut).read_metrics()]
                == [[row[key] for key in measured] for row in RunDir(tmp_path / "whole").read_metrics()]), name


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path: Path):
    out = str(tmp_path / "run")
    api.train(TrainConfig(data="digits", out=out, epochs=1), show_progress=False)
    before = load_file(str(tmp_path / "run" / "last.safetensors"))
    report = api.resume(out, epochs=2, show_progress=False)
    assert report["epochs"] == 2 and len(RunDir(out).read_metrics()) == 2
    after = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_balanced_sampler_and_class_weights_on_imbalanced_labels():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = epoch_order(labels, balanced=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[order], minlength=3).float()
    assert float(counts.min() / counts.max()) > 0.8  # about a third each
    weights = class_weights(labels, 3)
    assert torch.allclose(weights * torch.bincount(labels), torch.full((3,), 1000 / 3))


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 6, generator=generator)
    labels = torch.randint(0, 6, (300,), generator=generator)
    logits[torch.arange(150), labels[:150]] += 3.0  # half of them right
    metrics = classification_metrics(logits, labels, [f"c{i}" for i in range(6)])
    predicted = logits.argmax(1).numpy()
    assert metrics["confusion"] == confusion_matrix(labels.numpy(), predicted).tolist()
    for name, score in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        expected = score(labels.numpy(), predicted, average=None)
        assert [metrics["per_class"][f"c{i}"][name] for i in range(6)] == pytest.approx(expected, abs=1e-6)
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean()
    assert metrics["top_k"] == 5 and metrics["top_k_accuracy"] == pytest.approx(float(top5), abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels.numpy(), predicted, average="macro"), abs=1e-6)
    # a class the data does not hold but the model predicts counts against macro-F1, as in scikit-learn
    absent = labels != 5
    metrics = classification_metrics(logits[absent], labels[absent], [f"c{i}" for i in range(6)])
    assert (predicted[absent.numpy()] == 5).any()
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels[absent].numpy(), predicted[absent.numpy()], average="macro"),
                                                abs=1e-6)


def test_config_values_of_the_wrong_type_are_named_before_any_work(tmp_path):
    for values, message in ((dict(epochs=1.5), "epochs must be a whole number"), (dict(lr="1e-3"), "lr must be a number"),
                            (dict(strict=1), "strict must be true or false")):
        with pytest.raises(VisionflowError, match=message):
            api.train(TrainConfig(data="digits", out=str(tmp_path / "run"), **values), show_progress=False)
    assert not (tmp_path / "run").exists()
    cfg = TrainConfig(data="digits", out=tmp_path / "run").validate()  # a pathlib path is as good as a string
    assert cfg.out == str(tmp_path / "run")


def test_a_stretched_schedule_sets_the_rate_of_the_first_resumed_step(tmp_path):
    from torch import nn

    from visionflow.train.classifier import build_optimizer, build_schedule, restore_optimizer

    def steps(epochs: int, count: int, checkpoint=None):
        model = nn.Linear(2, 2)
        cfg = TrainConfig(data="x", out="-", epochs=epochs, lr=1e-3, schedule="cosine")
        optimizer = build_optimizer(cfg, model)
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=10)
        if checkpoint is not None:
            restore_optimizer(optimizer, schedule, checkpoint, RunDir(tmp_path))
        rates = []
        for _ in range(count):
            rates.append(optimizer.param_groups[0]["lr"])
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            schedule.step()
        return rates, {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}

    _, checkpoint = steps(2, 20)  # a finished 2-epoch run, whose last rate was 0
    resumed, _ = steps(4, 3, checkpoint)
    fresh, _ = steps(4, 23)
    assert resumed == pytest.approx(fresh[20:]) and resumed[0] > 0


def test_resume_with_more_epochs_extends_a_run_that_stopped_early(tmp_path):
    data = write_class_folder(tmp_path / "d", per_class=6)
    out = tmp_path / "run"
    # a rate too small to change a prediction: epoch 2 is no better than 1, so patience 1 stops the run there
    api.train(TrainConfig(data=str(data), out=str(out), epochs=4, patience=1, lr=1e-12, schedule="constant"),
              show_progress=False)
    assert len(RunDir(out).read_metrics()) == 2
    report = api.resume(str(out), epochs=5, show_progress=False)
    assert len(RunDir(out).read_metrics()) == 3 and report["epochs"] == 3  # one more, then patience again


def test_train_figures_count_the_images_trained_not_a_dropped_last_one(tmp_path):
    data = write_class_folder(tmp_path / "d", per_class=12)  # 36 images, 3 held out: 33 = 16 + 16 + 1
    report = api.train(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, batch_size=16),
                       show_progress=False)
    row = RunDir(tmp_path / "run").read_metrics()[0]
    assert report["validation"]["n"] == 3
    correct = round(row["train_accuracy"] * 32)  # 32 trained: the 1-image last batch is left out
    assert 0 < correct and row["train_accuracy"] == pytest.approx(correct / 32, abs=1e-6)


def test_adamw_takes_the_weight_decay_given_zero_included():
    from torch import nn

    from visionflow.train.classifier import build_optimizer

    for decay in (0.0, 0.05):
        cfg = TrainConfig(data="x", out="-", optimizer="adamw", weight_decay=decay)
        assert build_optimizer(cfg, nn.Linear(2, 2)).param_groups[0]["weight_decay"] == decay


def test_sgd_takes_the_momentum_given_zero_included(capsys):
    from torch import nn

    from visionflow.train.classifier import build_optimizer

    for momentum, nesterov in ((0.0, False), (0.5, True)):
        group = build_optimizer(TrainConfig(data="x", out="-", optimizer="sgd", momentum=momentum), nn.Linear(2, 2)).param_groups[0]
        assert (group["momentum"], group["nesterov"]) == (momentum, nesterov)
    assert main(["train", "digits", "--out", "-", "--momentum", "1"]) == 2  # a flag now, checked like the others
    assert "--momentum must be in [0, 1) (got 1.0)" in capsys.readouterr().err


def test_a_run_folder_under_the_home_folder_is_written_there_from_the_python_api(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # where a folder named '~' would appear
    report = api.train(TrainConfig(data="digits", out="~/runs/first", epochs=1), show_progress=False)
    assert (tmp_path / "home" / "runs" / "first" / "best.safetensors").exists() and not (tmp_path / "~").exists()
    assert api.evaluate("~/runs/first", "digits")["n"] == report["validation"]["n"]


def test_a_run_trained_on_a_gpu_resumes_on_the_cpu_when_told(tmp_path, capsys, caplog):
    if torch.cuda.is_available():
        pytest.skip("the recorded cuda device is available here")
    out = tmp_path / "run"
    assert main(["train", "digits", "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["device"] = "cuda"  # as recorded by a run on a GPU machine
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "digits", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err  # the recorded device, refused at once
    assert json.loads((out / "config.json").read_text()) == config and len(RunDir(out).read_metrics()) == 1
    assert main(["train", "digits", "--out", str(out), "--resume", "--epochs", "2", "--device", "cpu", "--quiet"]) == 0
    assert "ignored" not in caplog.text  # --device is where it runs now, not a setting --resume ignores
    assert len(RunDir(out).read_metrics()) == 2 and json.loads((out / "config.json").read_text())["train"]["device"] == "cpu"


def test_what_is_printed_while_the_training_bar_shows_on_a_terminal_stays_on_stdout(tmp_path: Path):
    """rich's progress bar routes sys.stdout to its console, stderr, unless told not to: what a caller (a thread, a
    library) printed while an epoch ran went to the terminal, not where stdout goes (as predict's rows once did)."""
    data = write_class_folder(tmp_path / "data", per_class=6)
    script = f"""
import sys
from visionflow import api
from visionflow.config import TrainConfig
import visionflow.train.classifier as classifier

epoch = classifier.train_one_epoch
def printing(*args, **kwargs):  # the caller prints while an epoch runs, its bar on the terminal
    print("printed during the epoch")
    return epoch(*args, **kwargs)
classifier.train_one_epoch = printing
api.train(TrainConfig(data={str(data)!r}, out={str(tmp_path / 'run')!r}, epochs=1))
"""
    result, shown = run_with_stderr_on_a_terminal([sys.executable, "-c", script])  # the bar shows on the terminal
    assert result.returncode == 0, shown
    assert result.stdout == b"printed during the epoch\n"
    assert b"epoch 1/1" in shown and b"printed during" not in shown  # the bar, and only it


def test_atomic_write_names_the_file_asked_for_not_its_temporary_one(tmp_path: Path):
    target = tmp_path / "grid.png"

    def write(tmp: str) -> None:
        open(f"{tmp}/inside", "w")  # the system refuses a path through the temporary file: NotADirectoryError

    with pytest.raises(NotADirectoryError) as caught:
        atomic_write(target, write)
    assert caught.value.filename == str(target)  # what the CLI's one line names
    assert list(tmp_path.iterdir()) == []  # and the temporary file is gone
