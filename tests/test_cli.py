"""The command line as a user meets it: each verb, each output format, each kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from visionflow import api
from visionflow.config import TrainConfig
from visionflow.data.sources import builtin_digits
from visionflow.devices import cpu_has_native_bf16
from visionflow.errors import VisionflowError
from visionflow.runs import RunDir

from conftest import add_images, flat_images, run_cli, run_with_stderr_on_a_terminal, write_class_folder
from visionflow.cli import main
from test_sources import write_idx, write_mnist


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data folder): the seed CNN trained on three generated pattern classes, with broken files."""
    root = tmp_path_factory.mktemp("cli")
    data = write_class_folder(root / "patterns", per_class=30)
    (data / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "stripes_h" / "empty.jpg").write_bytes(b"")
    (data / "stripes_v" / "readme.txt").write_text("not an image, ignored silently")
    result = run_cli("train", data, "--out", root / "run", "--epochs", "4", "--lr", "3e-3", "--quiet", "--val-split", "0.2")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "empty.jpg" in result.stderr and "readme.txt" not in result.stderr
    return root / "run", data


def assert_user_error(result, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_train_reports_skipped_files_and_learns(trained):
    run, _ = trained
    report = json.loads((run / "report.json").read_text())
    assert report["skipped_files"] == 2
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["broken.png", "empty.jpg"]
    assert report["validation"]["accuracy"] >= 0.9
    assert report["train_images_per_second"] > 0
    # config.json keeps "auto"; the report says what it became on this machine (a CNN: bf16 where native)
    assert report["device"] == "cpu" and report["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["square", "stripes_h", "stripes_v"] and config["preprocess"]["channels"] == 1


def test_evaluate_json(trained):
    run, data = trained
    result = run_cli("evaluate", run, data, "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 18  # 20% of 30 per class, the part the run held out
    assert metrics["accuracy"] == json.loads((run / "report.json").read_text())["validation"]["accuracy"]
    assert set(metrics["per_class"]) == {"square", "stripes_h", "stripes_v"}
    assert sum(map(sum, metrics["confusion"])) == 18 and metrics["images_per_second"] > 0
    assert metrics["top_k"] == 2  # fewer than 5 classes: k = classes - 1
    small = json.loads(run_cli("evaluate", run, data, "--json", "--batch-size", "5").stdout)  # 18 = 3 x 5 + 3
    assert small["n"] == 18 and small["confusion"] == metrics["confusion"]


def test_evaluate_streams_data_whose_decoded_images_would_not_fit_in_memory(trained, tmp_path: Path, monkeypatch):
    from visionflow import api
    from visionflow.data import loading

    run, data = trained
    monkeypatch.setattr(loading, "available_memory", lambda: 1000)  # not even the 18 held-out 16x16 images at once
    metrics = api.evaluate(str(run), str(data), batch_size=5)  # 18 = 3 x 5 + 3
    validation = json.loads((run / "report.json").read_text())["validation"]
    assert metrics["n"] == 18 and metrics["accuracy"] == validation["accuracy"]
    assert sum(map(sum, metrics["confusion"])) == 18 and metrics["skipped_files"] == 0
    other = tmp_path / "other"  # other data, a broken file among it: skipped and counted as it streams past
    for kind in ("square", "stripes_h", "stripes_v"):
        (other / kind).mkdir(parents=True)
        for name in ("000.png", "001.png", "002.png"):
            shutil.copy(data / kind / name, other / kind / name)
    (other / "stripes_h" / "001.png").write_bytes(b"not a png")
    metrics = api.evaluate(str(run), str(other), batch_size=2)
    assert metrics["n"] == 8 and metrics["skipped_files"] == 1
    assert [row["support"] for row in metrics["per_class"].values()] == [3, 2, 3]
    with pytest.raises(VisionflowError, match="refused by --strict.*stripes_h/001.png"):
        api.evaluate(str(run), str(other), strict=True)


def test_predict_formats_and_broken_rows(trained):
    run, data = trained
    result = run_cli("predict", run, data / "square", "--format", "jsonl", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 31  # 30 images and the broken one, which gets an error row instead of stopping the run
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.png") and broken[0]["label"] is None
    good = [r for r in rows if not r["error"]]
    assert sum(r["label"] == "square" for r in good) >= 27
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in good)
    assert_user_error(run_cli("predict", run, data / "square", "--strict"), "broken.png", "--strict")
    out = run.parent / "new" / "predictions.csv"  # its folder made, as for every other output
    result = run_cli("predict", run, str(data / "stripes_*" / "00*.png"), "--output", out)  # CSV, as named
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(table) == 20 and {r["label"] for r in table} <= {"square", "stripes_h", "stripes_v"}
    assert "wrote 20 rows to" in result.stderr


def test_a_decompression_bomb_is_named_once(trained, tmp_path: Path):
    run, data = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    Image.open(next((data / "square").glob("*.png"))).save(folder / "good.png")
    Image.new("1", (9_500, 9_500)).save(folder / "huge.png")  # 90 Mpx in a tiny file: over Pillow's limit too
    result = run_cli("predict", run, folder)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("huge.png") == 1 and "DecompressionBombWarning" not in result.stderr, result.stderr
    rows = dict(line.split("\t")[:2] for line in result.stdout.splitlines())
    assert rows[str(folder / "huge.png")] == "ERROR" and rows[str(folder / "good.png")] == "square"


def test_models_lists_parameter_counts_and_says_what_they_were_counted_on():
    from visionflow.models import count_parameters, create_model

    result = run_cli("models")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "parameters for 10 classes, counted on 28x28 grey images and on clips of 32x32 colour frames"
    line = next(l for l in lines if l.startswith("seed-cnn"))
    assert "121,930" in line  # the seed's Keras model has exactly this many parameters for 28x28x1, 10 classes
    # what the header says of clips is what was counted: colour frames, not the grey ones of moving-digits
    clip_count = int(next(l for l in lines if l.startswith("cnn-rnn")).split()[2].replace(",", ""))
    counts = {c: count_parameters(create_model("cnn-rnn", num_classes=10, in_channels=c, image_size=32)) for c in (1, 3)}
    assert clip_count == counts[3] != counts[1]


def test_preview_writes_a_grid(tmp_path: Path):
    result = run_cli("preview", "digits", "--augment", "rotate=20,elastic=1", "--out", tmp_path / "grid.png", "--count", "16")
    assert result.returncode == 0, result.stderr
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == (8 * 30 + 2, 2 * 30 + 2)  # 8 columns x 2 rows of 28 px with 2 px padding


def test_strict_refuses_the_first_broken_file(tmp_path: Path):
    data = write_class_folder(tmp_path / "d", per_class=4)
    (data / "square" / "zz-broken.png").write_bytes(b"nope")
    assert_user_error(run_cli("train", data, "--out", tmp_path / "run", "--strict", "--epochs", "1"), "zz-broken.png", "--strict")


def test_bad_input_is_one_line_exit_2(tmp_path: Path, trained):
    run, data = trained
    other = write_class_folder(tmp_path / "other", per_class=2)
    (other / "square").rename(other / "circle")
    assert_user_error(run_cli("evaluate", run, other), "circle")
    write_mnist(tmp_path / "mnist")
    assert_user_error(run_cli("evaluate", run, tmp_path / "mnist"), "classes")
    assert_user_error(run_cli("train", data, "--out", tmp_path / "x", "--model", "vgg99"), "unknown model 'vgg99'")
    assert_user_error(run_cli("train", tmp_path / "missing", "--out", tmp_path / "x"), "no such file")
    assert_user_error(run_cli("predict", tmp_path / "not-a-run", data), "no such run directory")
    assert_user_error(run_cli("predict", run, data, "--batch-size", "0"), "--batch-size")
    assert_user_error(run_cli("evaluate", run, data, "--batch-size", "0"), "--batch-size")
    assert_user_error(run_cli("preview", data, "--augment", "flip", "--out", tmp_path / "p.png", "--count", "0"), "--count")
    assert_user_error(run_cli("train", data, "--out", tmp_path / "x", "--augment", "sparkle"), "unknown operation")
    assert_user_error(run_cli("train", data, "--out", tmp_path / "x", "--epochs", "-1"), "--epochs")
    assert_user_error(run_cli("train", data, "--out", run), "already holds a run")
    (tmp_path / "single" / "only").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "single" / "only" / "a.png")
    assert_user_error(run_cli("train", tmp_path / "single", "--out", tmp_path / "x"), "only one class")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "b").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "hollow" / "a" / "a.png")
    assert_user_error(run_cli("train", tmp_path / "hollow", "--out", tmp_path / "x"), "holds no images")


def around_a_broken_file(data: Path, tmp_path: Path) -> Path:
    """tmp_path/incoming: a.png (a square of `data`), b.png (not an image), c.png (horizontal stripes)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(data / "square" / "000.png", folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    shutil.copy(data / "stripes_h" / "000.png", folder / "c.png")
    return folder


def test_predict_rows_keep_the_input_order_around_a_broken_file(trained, tmp_path: Path):
    run, data = trained
    folder = around_a_broken_file(data, tmp_path)
    result = run_cli("predict", run, folder, "--format", "csv")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [Path(r["path"]).name for r in table] == ["a.png", "b.png", "c.png"] and table[1]["error"]
    keep = tmp_path / "keep.csv"
    keep.write_text("earlier rows\n")
    assert_user_error(run_cli("predict", tmp_path / "no-run", folder, "--output", keep), "no such run directory")
    assert keep.read_text() == "earlier rows\n"  # checked before the file was opened
    odd = folder / os.fsdecode(b"odd\xffname.png")  # a name that is not UTF-8
    shutil.copy(folder / "a.png", odd)
    result = run_cli("predict", run, odd, "--format", "csv", "--output", keep)
    assert result.returncode == 0, result.stderr
    assert os.fsencode(str(odd)) in keep.read_bytes()  # written byte for byte
    if Path("/dev/full").exists():  # a full disk: one line, not a traceback
        assert_user_error(run_cli("predict", run, folder / "a.png", "--output", "/dev/full"), "no space left to write")


def test_predict_with_no_input_labelled_writes_the_error_rows_and_exits_2(trained, tmp_path: Path, capsys):
    run, _ = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "b.png").write_bytes(b"not a png")
    (folder / "e.jpg").write_bytes(b"")
    rows = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(folder), "--output", str(rows)]) == 2
    assert capsys.readouterr().err.splitlines() == [  # each named as it was skipped, as among images that label
        f"warning: skipped {folder / 'b.png'}: not a readable image (UnidentifiedImageError)",
        f"warning: skipped {folder / 'e.jpg'}: empty file",
        f"visionflow: error: none of the 2 inputs could be labelled: see the error rows in {rows}"]
    table = list(csv.DictReader(io.StringIO(rows.read_text())))
    assert [(Path(r["path"]).name, r["label"], bool(r["error"])) for r in table] == [("b.png", "", True),
                                                                                      ("e.jpg", "", True)]
    assert main(["predict", str(run), str(folder / "b.png"), "--format", "csv"]) == 2  # the row on stdout
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"warning: skipped {folder / 'b.png'}: not a readable image (UnidentifiedImageError)",
                                         "visionflow: error: the input could not be labelled: see the error row"]
    assert [r["error"] for r in csv.DictReader(io.StringIO(captured.out))] == ["not a readable image (UnidentifiedImageError)"]


def test_predict_resume_whose_every_new_input_failed_exits_2_though_the_rows_before_are_labels(trained, tmp_path: Path,
                                                                                              capsys):
    run, data = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(data / "square" / "000.png", folder / "a.png")
    rows = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(folder), "--output", str(rows)]) == 0
    (folder / "b.png").write_bytes(b"not a png")  # the only input left to label, and it fails
    capsys.readouterr()
    assert main(["predict", str(run), str(folder), "--output", str(rows), "--resume"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipped {folder / 'b.png'}: not a readable image (UnidentifiedImageError)",
        f"visionflow: error: the input could not be labelled: see the error row in {rows}"]
    table = list(csv.DictReader(io.StringIO(rows.read_text())))
    assert [(Path(r["path"]).name, r["label"], bool(r["error"])) for r in table] == [("a.png", "square", False),
                                                                                      ("b.png", "", True)]
    assert main(["predict", str(run), str(folder), "--output", str(rows), "--resume"]) == 0  # nothing left to label
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote 0 rows to {rows}, after the 2 it held"


def test_an_output_that_could_not_be_written_is_refused_before_the_labelling(trained, tmp_path: Path, capsys):
    run, data = trained
    folder = tmp_path / "rows.csv"
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    for output, message in ((folder, f"--output {folder}: is a folder; give the file's name"),
                            (a_file / "rows.csv", f"--output {a_file / 'rows.csv'}: {a_file} is a file, not a folder")):
        # refused before the inputs are listed (a missing one would be the error otherwise), and so before the
        # labelling, which would have failed at its first row
        assert user_error(capsys, ["predict", str(run), str(tmp_path / "missing"), "--output", str(output)]) == (
            f"visionflow: error: {message}")
    assert a_file.read_text() == "mine\n"


def test_export_to_a_place_that_cannot_hold_the_file_is_refused_before_the_export(tmp_path: Path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    # refused before the run is read: a missing run would be the error otherwise
    error = user_error(capsys, ["export", str(tmp_path / "no-run"), "--out", str(a_file / "model.onnx")])
    assert error.endswith(f"--out {a_file / 'model.onnx'}: {a_file} is a file, not a folder")
    assert a_file.read_text() == "mine\n"


def test_names_with_tabs_and_newlines_keep_one_row_per_line_in_the_table(trained, tmp_path: Path, capsys):
    run, data = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("tab\there.png", "new\nline.png", "comma,\"quote\".png"):
        shutil.copy(data / "square" / "000.png", folder / name)
    assert main(["predict", str(run), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[f"{folder}/comma,\"quote\".png", "square"],
                                                       [f"{folder}/new\\nline.png", "square"],
                                                       [f"{folder}/tab\\there.png", "square"]]
    assert main(["predict", str(run), str(folder), "--format", "csv"]) == 0  # CSV quotes the names as they are
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    assert sorted(Path(row["path"]).name for row in table) == sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_predict_resume_labels_only_what_an_interrupted_output_lacks(trained, tmp_path: Path, capsys, fmt):
    run, data = trained
    full, cut = tmp_path / f"full.{fmt}", tmp_path / f"cut.{fmt}"
    assert main(["predict", str(run), str(data / "square"), "--output", str(full)]) == 0
    lines = full.read_bytes().splitlines(keepends=True)
    assert len(lines) == 31 + (fmt == "csv")  # 30 images and broken.png's error row (and the CSV header)
    # killed mid-write: ten whole rows, then half of the eleventh
    kept = 11 if fmt == "csv" else 10
    cut.write_bytes(b"".join(lines[:kept]) + lines[kept][:20])
    capsys.readouterr()
    # the same inputs spelled another way ('./' and a trailing slash) are the same files
    relative = os.path.relpath(data / "square") + "/"
    assert main(["predict", str(run), "./" + relative, "--output", str(cut), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote 21 rows to {cut}, after the 10 it held"
    assert cut.read_bytes().startswith(b"".join(lines[:kept]))  # the earlier rows kept as they were

    def rows(path: Path) -> dict:
        text = path.read_text()
        table = list(csv.DictReader(io.StringIO(text))) if fmt == "csv" else map(json.loads, text.splitlines())
        return {os.path.abspath(row["path"]): (row["label"], row["score"], row["error"]) for row in table}

    assert len(cut.read_bytes().splitlines()) == len(lines) and rows(cut) == rows(full)  # each path once
    assert main(["predict", str(run), str(data / "square"), "--output", str(cut), "--resume"]) == 0
    assert "wrote 0 rows" in capsys.readouterr().err and rows(cut) == rows(full)
    # no output yet: --resume starts it
    assert main(["predict", str(run), str(data / "square"), "--output", str(tmp_path / f"new.{fmt}"), "--resume"]) == 0
    assert (tmp_path / f"new.{fmt}").read_bytes() == full.read_bytes()
    # killed within its first row: no row kept, so the file is written anew, with nothing said to be held before
    torn = tmp_path / f"torn.{fmt}"
    torn.write_bytes(b"".join(lines[:kept - 10]) + lines[kept - 10][:20])
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "square"), "--output", str(torn), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote 31 rows to {torn}"
    assert torn.read_bytes() == full.read_bytes()


def test_predict_resume_refuses_what_it_cannot_read_back(trained, tmp_path: Path, capsys):
    run, data = trained
    square = str(data / "square")
    assert "give --output" in user_error(capsys, ["predict", str(run), square, "--resume"])
    assert "csv or jsonl" in user_error(capsys, ["predict", str(run), square, "--output", str(tmp_path / "rows.txt"),
                                                 "--resume"])
    other = tmp_path / "budget.csv"
    other.write_text("year,amount\n2024,10")  # someone's CSV, its last line unterminated
    assert "not rows that predict wrote" in user_error(capsys, ["predict", str(run), square, "--output", str(other),
                                                               "--resume"])
    assert other.read_text() == "year,amount\n2024,10"  # untouched


def test_rows_piped_while_the_progress_bar_shows_on_a_terminal_go_to_stdout(trained):
    run, data = trained
    # stderr on a terminal: the progress bar shows there
    result, shown = run_with_stderr_on_a_terminal([sys.executable, "-m", "visionflow", "predict", str(run),
                                                   str(data / "square"), "--format", "csv"])
    assert result.returncode == 0, shown
    table = list(csv.DictReader(io.StringIO(result.stdout.decode())))
    assert len(table) == 31 and sum(row["label"] == "square" for row in table) >= 27  # in the pipe, every one
    assert b"labelling" in shown and b"000.png" not in shown  # the bar, and no row, on the terminal


def terminal_lines(shown: bytes) -> list[str]:
    """The lines a terminal shows for `shown`, near enough: escape sequences (colours, erasing, the cursor) left out,
    and of a line written over after a carriage return only what was written last."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_a_warning_while_the_progress_bar_shows_is_a_line_of_its_own(trained, tmp_path: Path):
    run, data = trained
    folder = around_a_broken_file(data, tmp_path)
    result, shown = run_with_stderr_on_a_terminal([sys.executable, "-m", "visionflow", "--threads", "1", "predict",
                                                   str(run), str(folder), "--output", str(tmp_path / "rows.csv")])
    assert result.returncode == 0, shown
    assert b"labelling" in shown  # the bar, drawn before the labelling started
    # written straight to stderr, the warning landed on the bar's line, right after the bar
    expected = rf"warning: skipped {re.escape(str(folder / 'b.png'))}: not a readable image \(\w+\)"
    assert any(re.fullmatch(expected, line) for line in terminal_lines(shown)), terminal_lines(shown)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_predict_stopped_by_sighup_keeps_every_row_written_and_resume_labels_the_rest(trained, tmp_path: Path):
    run, _ = trained
    many = write_class_folder(tmp_path / "many", per_class=300, seed=1)  # slow enough at one image a batch
    inputs = sorted(str(p) for p in many.rglob("*.png"))
    rows = tmp_path / "rows.csv"
    command = [sys.executable, "-m", "visionflow", "--threads", "1", "predict", str(run), str(many), "--output",
               str(rows), "--batch-size", "1", "--quiet"]

    def stopped(ignore_hangup: bool) -> subprocess.CompletedProcess:
        rows.unlink(missing_ok=True)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: ignore_hangup and signal.signal(signal.SIGHUP, signal.SIG_IGN))
        deadline = time.time() + 120
        while not (rows.exists() and rows.stat().st_size) and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # until the first rows are in the file (the buffer's first 8 KB)
        process.send_signal(signal.SIGHUP)  # the terminal closed
        stdout, stderr = process.communicate(timeout=120)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    result = stopped(ignore_hangup=False)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1] == (f"visionflow: interrupted; the rows written so far are in {rows}: the "
                                              "same command with --resume labels the rest")
    data = rows.read_bytes()
    assert data.endswith(b"\r\n")  # every row written is whole, none cut short
    written = list(csv.DictReader(io.StringIO(data.decode())))
    assert 0 < len(written) < len(inputs) and all(r["label"] and r["score"] for r in written)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"wrote {len(inputs) - len(written)} rows to {rows}, after the {len(written)} it held" in resumed.stderr
    table = list(csv.DictReader(io.StringIO(rows.read_text())))
    assert table[:len(written)] == written and sorted(r["path"] for r in table) == inputs  # each input once
    # started under `nohup` (SIGHUP ignored), it stays ignored: the labelling goes on to the end
    result = stopped(ignore_hangup=True)
    assert result.returncode == 0, result.stderr
    assert sorted(r["path"] for r in csv.DictReader(io.StringIO(rows.read_text()))) == inputs


def test_predict_goes_on_past_a_glob_that_matches_nothing_and_globs_skip_non_images(trained, tmp_path: Path, capsys,
                                                                                     caplog):
    run, data = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(data / "square" / "000.png", folder / "a.png")
    (folder / "notes.txt").write_text("not an image: a glob passes over it, as a folder does")
    assert main(["predict", str(run), str(folder / "*"), str(tmp_path / "typo*.png"), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(Path(r["path"]).name, r["label"], r["error"]) for r in table] == [("a.png", "square", "")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{tmp_path / 'typo*.png'}: no such file, folder or matching glob; going on with the other inputs"]
    # named on its own, a non-image is a row with its error, as an unreadable image is (no input labelled: exit 2)
    assert main(["predict", str(run), str(folder / "notes.txt"), "--format", "csv"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: skipped {folder / 'notes.txt'}: not a readable image (UnidentifiedImageError)",
        "visionflow: error: the input could not be labelled: see the error row"]
    table = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(table) == 1 and table[0]["path"].endswith("notes.txt") and "not a readable image" in table[0]["error"]
    # nothing at all to label: still an error, naming the globs
    assert user_error(capsys, ["predict", str(run), str(tmp_path / "typo*.png"), str(folder / "*.jpg")]) == (
        f"visionflow: error: nothing to label: {tmp_path / 'typo*.png'}: no such file, folder or matching glob; "
        f"{folder / '*.jpg'}: no such file, folder or matching glob")
    # and a path that is no glob is a typo, refused before any row (as `repair run` refuses it)
    assert "nope.png: no such file" in user_error(capsys, ["predict", str(run), str(folder / "a.png"), str(folder / "nope.png")])


def test_predict_names_a_glob_or_folder_that_gives_no_image_and_labels_the_rest(trained, tmp_path: Path, capsys, caplog):
    run, data = trained
    for folder in ("notes", "empty", "good"):
        (tmp_path / folder).mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    shutil.copy(data / "square" / "000.png", tmp_path / "good" / "a.png")
    assert main(["predict", str(run), str(tmp_path / "notes" / "*"), str(tmp_path / "empty"), str(tmp_path / "good"),
                 "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(Path(r["path"]).name, r["label"]) for r in table] == [("a.png", "square")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{tmp_path / 'notes' / '*'}: matches no image files; going on with the other inputs",
                        f"{tmp_path / 'empty'}: holds no image files; going on with the other inputs"]
    # nothing at all left: one line, exit 2, naming every input with why it gave nothing (an empty folder beside a
    # glob that matches no file had gone unnamed, as though the glob alone had given nothing)
    assert user_error(capsys, ["predict", str(run), str(tmp_path / "notes" / "*"), str(tmp_path / "empty")]) == (
        f"visionflow: error: nothing to label: {tmp_path / 'notes' / '*'}: matches no image files; "
        f"{tmp_path / 'empty'}: holds no image files")
    assert user_error(capsys, ["predict", str(run), str(tmp_path / "empty"), str(tmp_path / "typo*.png")]) == (
        f"visionflow: error: nothing to label: {tmp_path / 'empty'}: holds no image files; "
        f"{tmp_path / 'typo*.png'}: no such file, folder or matching glob")


def test_a_quoted_tilde_is_the_home_folder_in_every_path_argument(trained, tmp_path: Path, monkeypatch, capsys):
    run, data = trained
    assert run.parent == data.parent
    monkeypatch.setenv("HOME", str(run.parent))  # ~ is the folder that holds the run and the data
    monkeypatch.chdir(tmp_path)
    assert main(["predict", f"~/{run.name}", f"~/{data.name}/square/00*.png", f"~/{data.name}/stripes_h",
                 "--output", "~/rows.csv"]) == 0
    assert len((run.parent / "rows.csv").read_text().splitlines()) == 1 + 10 + 31  # a header, 10 + 30 images, empty.jpg
    assert main(["preview", "digits", "--augment", "flip", "--count", "2", "--out", "~/grid.png"]) == 0
    assert (run.parent / "grid.png").is_file()
    assert list(tmp_path.iterdir()) == []  # no folder named '~' where the command ran


def user_error(capsys, argv: list[str]) -> str:
    """The one line a user error prints, run in this process (exit 2 checked)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_settings_that_cannot_train_fail_before_the_run_folder_is_written(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    train = ["train", str(data), "--out", str(out), "--epochs", "1"]
    assert "--weight-decay must be 0 or more" in user_error(capsys, [*train, "--weight-decay", "-1"])
    assert "--patience must be 0 (off)" in user_error(capsys, [*train, "--patience", "-1"])
    assert "--lr must be a finite number (got inf)" in user_error(capsys, [*train, "--lr", "inf"])
    assert "'none' stands alone" in user_error(capsys, [*train, "--augment", "none,flip"])
    assert "--seed must be between 0 and 2**32 - 1" in user_error(capsys, [*train, "--seed", "-1"])
    assert "--gan-ratio 2 needs --gan-augment RUN" in user_error(capsys, [*train, "--gan-ratio", "2"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in user_error(capsys, [*train, "--device", "cuda"])
    assert not out.exists()
    (tmp_path / "a-file").write_text("")
    assert "a-file is a file, not a folder" in user_error(capsys, ["train", str(data), "--out", str(tmp_path / "a-file" / "run")])
    for verb in (["train"], ["gan", "train"], ["repair", "train"]):  # a GAN's samples would be a class of their own
        assert "is inside the data folder" in user_error(capsys, [*verb, str(data), "--out", str(data / "square" / "run")])
        if not torch.cuda.is_available():
            assert "no CUDA GPU" in user_error(capsys, [*verb, str(data), "--out", str(out), "--device", "cuda"])
    assert not (data / "square" / "run").exists() and not out.exists()
    # what the system refuses further on is one line naming the path too
    assert f"--out {tmp_path / 'a-file' / 'x.png'}: {tmp_path / 'a-file'} is a file, not a folder" in user_error(
        capsys, ["preview", str(data), "--augment", "flip", "--out", str(tmp_path / "a-file" / "x.png")])
    assert f"--out {tmp_path}: not an image file name" in user_error(
        capsys, ["preview", str(data), "--augment", "flip", "--out", str(tmp_path)])


def test_data_that_cannot_train_is_named(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=6)
    for image in (data / "stripes_v").iterdir():
        image.write_bytes(b"")  # every file of one class unreadable
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    *skipped, error = capsys.readouterr().err.strip().splitlines()  # each file named as it is skipped, then why
    named = {f"warning: skipped {image}: empty file" for image in (data / "stripes_v").iterdir()}
    assert set(skipped) <= named and len(set(skipped)) == len(skipped) >= 5  # its training files: all but one held out
    assert error == f"visionflow: error: {data}: no readable training images in class(es) stripes_v"
    tiny = write_class_folder(tmp_path / "tiny", per_class=1)
    assert "too few images to validate on (3 in all, 10% held out); add images" in user_error(
        capsys, ["train", str(tiny), "--out", str(tmp_path / "run"), "--epochs", "1"])


def test_a_run_that_never_finished_an_epoch_gives_way_to_a_new_one(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    out.mkdir()
    # what an interruption before the first epoch's end leaves: its config and held-out split, no weights
    (out / "config.json").write_text(json.dumps({"version": 1, "train": {}, "preprocess": {}, "classes": ["x", "y"]}))
    (out / "split.json").write_text(json.dumps({"held_out": ["elsewhere/x/1.png"]}))
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet", "--val", str(data)]) == 0
    assert json.loads((out / "config.json").read_text())["classes"] == ["square", "stripes_h", "stripes_v"]
    assert not (out / "split.json").exists()  # nothing of the old attempt stays to mislead evaluate
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "version": "4.1"}))  # a version, like many
    (other / "metrics.csv").write_text("theirs\n")
    capsys.readouterr()
    assert "holds a config.json that is not a visionflow run's" in user_error(
        capsys, ["train", str(data), "--out", str(other), "--epochs", "1", "--quiet"])
    assert json.loads((other / "config.json").read_text()) == {"model_type": "bert", "version": "4.1"}
    assert (other / "metrics.csv").read_text() == "theirs\n"


def test_frames_given_for_images_is_named_as_ignored(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "d", per_class=5, size=12)
    argv = ["train", str(data), "--epochs", "1", "--val-split", "0.4", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--frames", "8"]) == 0
    assert caplog.messages == ["model 'seed-cnn' takes images, not clips; ignored: --frames"]
    caplog.clear()
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert caplog.messages == []  # not given: nothing to say
    assert main(["preview", str(data), "--augment", "flip", "--frames", "8", "--out", str(tmp_path / "grid.png")]) == 0
    assert caplog.messages == [f"{data} holds images, not clips; ignored: --frames"]


def test_resume_reads_the_data_where_it_is_now_and_names_what_it_ignores(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    moved = data.rename(tmp_path / "moved")
    # the data still at the old place, or data of other classes: the error alone, not after the warning naming the
    # flags ignored
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(out), "--resume", "--epochs", "2", "--model", "resnet18"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: {data}: no such file or folder (and not a built-in data set: digits)"]
    other = flat_images(tmp_path / "other", ("a", "b"))
    assert main(["train", str(other), "--out", str(out), "--resume", "--epochs", "2", "--model", "resnet18"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: {other}: its classes ['a', 'b'] differ from the run's ['square', 'stripes_h', 'stripes_v']"]
    # --gan-augment naming no run: refused before the warning and before any decoding (which would name the broken file)
    (other / "a" / "broken.png").write_bytes(b"")
    assert main(["train", str(other), "--out", str(tmp_path / "augmented"), "--frames", "8",
                 "--gan-augment", str(tmp_path / "no-gan")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: --gan-augment {tmp_path / 'no-gan'}: no such run directory"]
    assert main(["train", str(moved), "--out", str(out), "--resume", "--epochs", "2", "--model", "resnet18",
                 "--patience", "0", "--quiet"]) == 0
    assert "ignored: --model, --patience" in caplog.text  # a flag given as 0 is named too
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"] == "seed-cnn" and config["data_spec"] == str(moved.resolve())
    held_out = json.loads((out / "split.json").read_text())["held_out"]
    assert len(held_out) == 3 and all(path.startswith(str(moved)) for path in held_out)
    capsys.readouterr()
    assert main(["evaluate", str(out), str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3  # the held-out images, found under the new path
    assert "already finished 2 epochs" in user_error(capsys, ["train", str(moved), "--out", str(out), "--resume", "--epochs", "1"])
    copy = shutil.copytree(moved, tmp_path / "copy")
    caplog.clear()
    assert main(["evaluate", str(out), str(copy), "--json"]) == 0  # a copy: its held-out part, not training images
    assert json.loads(capsys.readouterr().out)["n"] == 3 and "moved or copied: scoring the 3 images" in caplog.text
    fresh = write_class_folder(tmp_path / "fresh", per_class=10, seed=7)  # new images under the same names
    caplog.clear()
    assert main(["evaluate", str(out), str(fresh), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 30 and "moved or copied" not in caplog.text
    assert "is not the data the run trained on" in user_error(
        capsys, ["train", str(fresh), "--out", str(out), "--resume", "--epochs", "3"])
    moved_again = moved.rename(tmp_path / "moved-again")  # the original gone: nothing to compare bytes with
    assert main(["evaluate", str(out), str(moved_again), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_resume_holds_out_what_the_run_held_out_when_images_were_added(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    held_out = json.loads((out / "split.json").read_text())["held_out"]
    assert len(held_out) == 3
    add_images(data, 3, seed=1)  # a seeded split of 13 images a class would hold out others, trained on in epoch 1
    assert main(["train", str(data), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert caplog.messages == [f"{data}: 9 more files to train on than when the run started; the images held out in "
                               "split.json stay held out"]
    split = json.loads((out / "split.json").read_text())
    assert split["held_out"] == held_out
    assert json.loads((out / "report.json").read_text())["validation"]["n"] == 3
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    trained_on = api.load_training_data(cfg, 1, 12, split=split).train.origins  # what the resume trained on
    assert len(trained_on) == 27 + 9 and not set(trained_on) & set(held_out)

    moved = data.rename(tmp_path / "moved")  # moved, and added to again: the same items, under its paths now
    add_images(moved, 1, seed=2)
    held_out = [os.path.join(moved.resolve(), os.path.relpath(path, data.resolve())) for path in held_out]
    caplog.clear()
    assert main(["train", str(moved), "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert "12 more files to train on than when the run started" in caplog.text
    assert json.loads((out / "split.json").read_text())["held_out"] == held_out

    os.unlink(held_out[0])  # a held-out image gone: said, and the others still validate
    caplog.clear()
    assert main(["train", str(moved), "--out", str(out), "--resume", "--epochs", "4", "--quiet"]) == 0
    assert ("12 more files to train on than when the run started, and 1 of the 3 held-out images is gone "
            "(validating on the other 2)") in caplog.text
    assert json.loads((out / "report.json").read_text())["validation"]["n"] == 2
    assert json.loads((out / "split.json").read_text())["held_out"] == held_out  # if it comes back, it stays held out
    os.unlink(held_out[1])  # most of them gone: the validation would not compare with the earlier epochs'
    capsys.readouterr()
    assert "2 of the 3 images the run held out for validation (split.json) are gone" in user_error(
        capsys, ["train", str(moved), "--out", str(out), "--resume", "--epochs", "5"])


def test_resume_counts_files_added_to_one_class_and_removed_from_another_though_the_total_is_the_same(
        tmp_path: Path, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    argv = ["train", str(data), "--out", str(out), "--quiet"]
    assert main([*argv, "--epochs", "1"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["training_items_per_class"] == {"square": 9, "stripes_h": 9, "stripes_v": 9}
    assert main([*argv, "--resume", "--epochs", "2"]) == 0
    assert caplog.messages == []  # nothing changed: nothing to say
    held_out = set(split["held_out"])
    removed = next(path for path in sorted(map(str, (data / "stripes_h").glob("*.png"))) if path not in held_out)
    os.unlink(removed)
    shutil.copy(data / "square" / "000.png", data / "square" / "copy.png")  # 27 files to train on, as before
    assert main([*argv, "--resume", "--epochs", "3"]) == 0
    assert caplog.messages == [f"{data}: 1 more file and 1 fewer to train on than when the run started; the images "
                               "held out in split.json stay held out"]
    assert json.loads((out / "split.json").read_text()) == split  # counted from the start, at every resume
    caplog.clear()
    old = {name: value for name, value in split.items() if name != "training_items_per_class"}
    (out / "split.json").write_text(json.dumps(old))  # a run from before the counts: the total alone, as then
    assert main([*argv, "--resume", "--epochs", "4"]) == 0
    assert caplog.messages == []


def test_resume_with_fewer_than_two_images_left_to_train_on_is_one_line(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    held_out = set(json.loads((out / "split.json").read_text())["held_out"])
    training = sorted(path for path in map(str, data.rglob("*.png")) if path not in held_out)
    for path in training[1:]:
        os.unlink(path)  # one training image left, and every held-out one
    capsys.readouterr()
    caplog.clear()
    assert user_error(capsys, ["train", str(data), "--out", str(out), "--resume", "--epochs", "2"]) == (
        f"visionflow: error: {data}: too few images to train on (1 of the images the run trains on is left); put the "
        "others back, or train a new run")
    assert caplog.messages == []  # the error comes before the warning that would count the 26 gone
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1]


def test_resume_on_data_whose_classes_or_one_class_s_training_images_changed_is_one_line_saying_so(
        tmp_path: Path, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    resume = ["train", str(data), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    kept = shutil.copytree(data, tmp_path / "kept")

    def stderr_of_refused_resume() -> list[str]:
        result = run_cli("--threads", "1", *resume)  # a process of its own: stderr as a user sees it, warnings too
        assert result.returncode == 2, result.stderr
        return result.stderr.splitlines()

    add_images(data, 1, seed=1)  # files that a warning would count: the classes are what refuses the data
    write_class_folder(tmp_path / "more", per_class=2, size=12)
    (tmp_path / "more" / "square").rename(data / "dots")
    assert stderr_of_refused_resume() == [
        f"visionflow: error: {data}: its classes ['dots', 'square', 'stripes_h', 'stripes_v'] differ from the run's "
        "['square', 'stripes_h', 'stripes_v']"]
    shutil.rmtree(data / "dots")
    held_out = set(json.loads((out / "split.json").read_text())["held_out"])
    for path in (data / "stripes_v").iterdir():
        if str(path) not in held_out:
            path.unlink()  # every image of the class the run trains on; its held-out one is still there
    # not the warning counting the files added and removed, nor 'no readable training images' after decoding
    assert stderr_of_refused_resume() == [
        f"visionflow: error: {data}: class 'stripes_v' has no images left to train on (9 gone since the run started); "
        "put them back, or train a new run"]
    shutil.rmtree(data / "stripes_v")
    shutil.copytree(kept / "stripes_v", data / "stripes_v")  # put back: the files added to the others are counted
    caplog.clear()
    assert main(resume) == 0
    assert caplog.messages == [f"{data}: 2 more files to train on than when the run started; the images held out in "
                               "split.json stay held out"]
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1, 2]

def test_resuming_a_checkpoint_that_does_not_fit_the_config_is_one_line(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=6, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["model"] = "resnet18"  # edited by hand: checkpoint.pt holds seed-cnn's weights
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    error = user_error(capsys, ["train", str(data), "--out", str(out), "--resume", "--epochs", "2"])
    assert f"{out / 'checkpoint.pt'}: weights do not fit the model in config.json (Missing key(s)" in error
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1]  # nothing trained on the wrong weights


def test_moved_data_missing_some_held_out_images_resumes_as_data_not_moved_does(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    moved = data.rename(tmp_path / "moved")
    held_out = [os.path.join(moved.resolve(), os.path.relpath(path, data.resolve()))
                for path in json.loads((out / "split.json").read_text())["held_out"]]
    os.unlink(held_out[0])  # and one of the 3 held-out images deleted
    capsys.readouterr()
    assert main(["evaluate", str(out), str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert caplog.messages == [f"{moved} holds the data the run trained on ({data}), moved or copied: 1 of the 3 "
                               "held-out images is gone (scoring the other 2)"]
    caplog.clear()
    assert main(["train", str(moved), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert caplog.messages == [f"{moved}: 1 of the 3 held-out images is gone (validating on the other 2); the images "
                               "held out in split.json stay held out"]  # as for the data where it was
    assert json.loads((out / "report.json").read_text())["validation"]["n"] == 2
    assert json.loads((out / "split.json").read_text())["held_out"] == held_out
    again = moved.rename(tmp_path / "again")  # moved again with most of them gone: not told apart from other data
    os.unlink(again / os.path.relpath(held_out[1], moved.resolve()))
    capsys.readouterr()
    assert "is not the data the run trained on" in user_error(
        capsys, ["train", str(again), "--out", str(out), "--resume", "--epochs", "3"])
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1, 2]


def test_evaluate_on_the_runs_data_with_held_out_images_gone_says_so_and_never_scores_training_images_unsaid(
        tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    held_out = json.loads((out / "split.json").read_text())["held_out"]
    os.unlink(held_out[0])
    capsys.readouterr()
    caplog.clear()
    assert main(["evaluate", str(out), str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert caplog.messages == [f"{data}: 1 of the 3 held-out images is gone (scoring the other 2)"]  # as --resume says
    os.unlink(held_out[1])  # most of them gone: the other images of the data trained the run
    assert user_error(capsys, ["evaluate", str(out), str(data)]) == (
        f"visionflow: error: {data}: 2 of the 3 images the run held out (split.json) are gone, and the others trained "
        "it; put back what is missing, or evaluate on other data")
    moved = data.rename(tmp_path / "moved")  # and moved: not told apart from other data, which is scored in full
    caplog.clear()
    assert main(["evaluate", str(out), str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 28
    assert caplog.messages == [f"scoring all of {moved} as other data: it holds 1 of the 3 images the run held out "
                               f"(split.json) at their places in {data}, the others gone (if it is that data, moved, "
                               "the run trained on the rest)"]


def test_a_single_held_out_image_gone_is_named_as_one(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=3, size=12)
    for image in [*sorted((data / "square").iterdir())[1:], *sorted((data / "stripes_h").iterdir())[1:]]:
        image.unlink()  # classes of one image hold none out: stripes_v's three hold out one
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    [held_out] = json.loads((out / "split.json").read_text())["held_out"]
    os.unlink(held_out)
    capsys.readouterr()
    assert user_error(capsys, ["evaluate", str(out), str(data)]) == (
        f"visionflow: error: {data}: the one image the run held out (split.json) is gone, and the others trained it; "
        "put back what is missing, or evaluate on other data")
    assert user_error(capsys, ["train", str(data), "--out", str(out), "--resume", "--epochs", "2"]) == (
        f"visionflow: error: {data}: the one image the run held out for validation (split.json) is gone; put back what "
        "is missing, or train a new run")


@pytest.mark.parametrize("trained_with,edit,difference", [
    ([], {"optimizer": "sgd"}, "the checkpoint holds Adam's state, config.json says sgd"),  # traceback at the first step
    (["--optimizer", "sgd"], {"optimizer": "adam"}, "the checkpoint holds SGD's state, config.json says adam"),
    ([], {"optimizer": "adamw"}, "the checkpoint holds Adam's state, config.json says adamw"),  # AdamW took it silently
    (["--optimizer", "adamw"], {"optimizer": "adam"}, "the checkpoint holds AdamW's state, config.json says adam"),
    (["--optimizer", "sgd"], {"momentum": 0.5}, "config.json's SGD: momentum 0.5, the checkpoint's: 0.9"),  # trained on
])
def test_resuming_an_optimizer_state_that_does_not_fit_the_config_is_one_line(tmp_path: Path, capsys, trained_with,
                                                                            edit, difference):
    data = write_class_folder(tmp_path / "data", per_class=6, size=12)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet", *trained_with]) == 0
    config = json.loads((out / "config.json").read_text())
    config["train"].update(edit)  # edited by hand: checkpoint.pt holds the state of the optimizer the run trained with
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    error = user_error(capsys, ["train", str(data), "--out", str(out), "--resume", "--epochs", "2"])
    assert error == (f"visionflow: error: {out / 'checkpoint.pt'}: its optimizer state does not fit the optimizer "
                     f"config.json describes ({difference}); put back the settings the run trained with, or train a "
                     "new run")
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1]  # nothing trained
    config["train"].update({"optimizer": trained_with[1] if trained_with else "adam", "momentum": 0.9})
    (out / "config.json").write_text(json.dumps(config))  # put back: it resumes
    assert main(["train", str(data), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert [row["epoch"] for row in RunDir(out).read_metrics()] == [1, 2]


def test_resume_reads_val_where_it_is_now(tmp_path: Path, capsys, caplog):
    data = write_class_folder(tmp_path / "data", per_class=6)
    val = write_class_folder(tmp_path / "val", per_class=2, seed=3)
    out = tmp_path / "run"
    assert main(["train", str(data), "--val", str(val), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    moved = val.rename(tmp_path / "val-moved")
    assert main(["train", str(data), "--val", str(moved), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert "ignored" not in caplog.text
    assert json.loads((out / "config.json").read_text())["train"]["val"] == str(moved)
    assert json.loads((out / "report.json").read_text())["validation"]["n"] == 6  # the moved validation images


def test_val_chooses_the_epoch_and_test_is_what_evaluate_scores(tmp_path: Path, capsys, caplog):
    for part, count in (("train", 8), ("val", 3), ("test", 4)):
        write_class_folder(tmp_path / "d" / part, per_class=count, seed=len(part))
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["validation_data"] == "the data's val/ part" and report["validation"]["n"] == 9
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    # validated on --val, then scored on its own training images: said so
    assert main(["train", str(tmp_path / "d" / "train"), "--val", str(tmp_path / "d" / "val"), "--out",
                 str(tmp_path / "run2"), "--epochs", "1", "--quiet"]) == 0
    caplog.clear()
    assert main(["evaluate", str(tmp_path / "run2"), str(tmp_path / "d" / "train"), "--json"]) == 0
    assert "the run trained on these images" in caplog.text
    # the part is named as the data names it
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "validation")
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "run3"), "--epochs", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "run3" / "report.json").read_text())["validation_data"] == (
        "the data's validation/ part")


def test_damaged_run_files_are_one_line_exit_2_and_nothing_is_unpickled(tmp_path: Path, trained):
    run, data = trained
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    weights = (damaged / "best.safetensors").read_bytes()
    (damaged / "best.safetensors").write_bytes(weights[: len(weights) // 2])  # a copy cut short
    assert_user_error(run_cli("predict", damaged, data), "best.safetensors", "unreadable weights")
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "preprocess"}))
    assert_user_error(run_cli("predict", damaged, data), "config.json: no preprocess")
    (damaged / "config.json").write_text(json.dumps(config))
    for broken in ((run / "checkpoint.pt").read_bytes()[:4096], b"", b"garbage\n"):  # cut short, empty, not one at all
        (damaged / "checkpoint.pt").write_bytes(broken)
        assert_user_error(run_cli("train", data, "--out", damaged, "--resume", "--epochs", "5"), "checkpoint.pt",
                          "unreadable checkpoint")
    marker = tmp_path / "code-ran"

    class Payload:  # a checkpoint that would create `marker` when unpickled: refused, and the code never runs
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"model": Payload()}, damaged / "checkpoint.pt")
    assert_user_error(run_cli("train", data, "--out", damaged, "--resume", "--epochs", "5"), "checkpoint.pt", "refused")
    assert not marker.exists()


def test_grey_data_is_evaluated_by_a_colour_run_as_files_are(tmp_path: Path):
    """Grey arrays (MNIST, digits) given to a run trained on colour are converted as grey image files are: the grey
    repeated in each channel, as training did for grey data with --channels 3."""
    assert run_cli("train", "digits", "--out", tmp_path / "grey-as-rgb", "--epochs", "1", "--channels", "3",
                   "--quiet").returncode == 0
    result = run_cli("evaluate", tmp_path / "grey-as-rgb", "digits")
    assert result.returncode == 0 and float(result.stdout.split("accuracy")[1].split()[0]) > 0.5, result.stderr
    # the same 40 digits as grey arrays (an MNIST folder's test part) and as grey PNG files in class folders: digits,
    # not noise, so that what the run predicts depends on the pixels and a conversion that differs shows
    digits = builtin_digits()
    images, labels = digits.images[-40:], digits.labels[-40:]
    (tmp_path / "mnist").mkdir()
    for part, (part_images, part_labels) in {"train": (images, labels), "t10k": (images, labels)}.items():
        write_idx(tmp_path / "mnist" / f"{part}-images-idx3-ubyte.gz", part_images)
        write_idx(tmp_path / "mnist" / f"{part}-labels-idx1-ubyte.gz", part_labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "pngs" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "pngs" / str(label) / f"{i}.png")
    scored = [run_cli("evaluate", tmp_path / "grey-as-rgb", tmp_path / data, "--json", "--precision", "fp32")
              for data in ("mnist", "pngs")]
    assert all(result.returncode == 0 for result in scored), [result.stderr for result in scored]
    arrays, files = (json.loads(result.stdout) for result in scored)
    assert arrays["n"] == files["n"] == 40 and arrays["confusion"] == files["confusion"]  # the same grey, the same labels
    assert arrays["accuracy"] > 0.5  # the digits are read as digits: the matrices compare real predictions


def test_demo_reaches_its_promise_and_replaces_only_its_own_folder(tmp_path: Path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    accuracy = float(next(l for l in result.stdout.splitlines() if "held-out accuracy" in l).split()[2])
    assert accuracy >= 0.97  # the README's promise
    labelled = [l for l in result.stdout.splitlines() if l.strip().startswith("held_out_")]
    assert len(labelled) == 8 and sum(l.split()[1] == l.split()[2] for l in labelled) >= 7
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "precious.txt").write_text("keep me")
    assert_user_error(run_cli("demo", "--out", user_folder), "not a demo run")
    assert (user_folder / "precious.txt").read_text() == "keep me"


def test_threads_option_sets_the_cpu_threads_and_the_report_records_them(tmp_path):
    data = write_class_folder(tmp_path / "patterns", per_class=10)
    result = run_cli("--threads", "1", "train", data, "--out", tmp_path / "run", "--epochs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["threads"] == 1
    assert_user_error(run_cli("--threads", "0", "train", data, "--out", tmp_path / "other"), "--threads", "at least 1")
    assert not (tmp_path / "other").exists()


def test_ctrl_c_while_torch_loads_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    """The CLI module itself is light: torch (seconds) loads inside main's error handling, where Ctrl-C is an
    interruption (exit 130, one line). The interruption is raised where main imports torch: a real SIGINT sent while
    torch loads was timing-dependent (an import that catches BaseException can swallow it)."""
    import subprocess
    import sys

    from visionflow import cli

    code = "import sys, visionflow.cli; print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip() == "[]"
    # and every verb's parser (built for --help and usage errors as well) leaves matplotlib to the figures
    code = "import sys, visionflow.cli; visionflow.cli.build_parser(); print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip() == "False"

    import builtins

    real_import = builtins.__import__

    def ctrl_c_while_torch_loads(name, *args, **kwargs):
        if name == "torch":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", ctrl_c_while_torch_loads)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "visionflow: interrupted\n"


@pytest.mark.parametrize("argv", [
    ["datasets", "make", "moving-digits", "{out}", "--clips", "2", "--format", "npy"],
    ["gan", "sample", "{out}", "--out", "{out}/grid.png"],
    ["gan", "evaluate", "{out}", "digits"],
    ["repair", "evaluate", "{out}", "digits", "--mask", "random"],
])
def test_a_seed_numpy_cannot_take_is_one_line_on_every_verb(tmp_path: Path, capsys, argv):
    argv = [arg.format(out=tmp_path / "x") for arg in argv] + ["--seed", "-1"]
    assert user_error(capsys, argv) == "visionflow: error: --seed must be between 0 and 2**32 - 1 (got -1)"


@pytest.mark.parametrize("argv,message", [
    (["gan"], "required: {train,sample,evaluate} (see `visionflow gan --help`)"),  # not argparse's "gan_command"
    (["datasets", "make"], "required: {moving-digits} (see `visionflow datasets make --help`)"),
    (["train", "digits", "--out", "x", "--bogus"], "unrecognized arguments: --bogus (see `visionflow train --help`)"),
    (["repair", "train", "digits", "--out", "x", "--bogus", "1"], "(see `visionflow repair train --help`)"),
    # a global option after the verb is not an unknown one: where it goes, on every verb
    (["models", "--threads", "1"],
     "error: --threads is a global option, given before the verb: `visionflow --threads 1 models` (see `visionflow --help`)"),
    (["gan", "train", "digits", "--out", "x", "--threads=2"], "`visionflow --threads=2 gan train digits --out x`"),
    (["gan", "--threads", "2", "train", "my digits"], "`visionflow --threads 2 gan train 'my digits'`"),  # between verbs
])
def test_usage_errors_name_the_verb_and_its_help(capsys, argv, message):
    assert message in user_error(capsys, argv)


@pytest.mark.parametrize("verb,option", [(["predict"], "--output"), (["preview"], "--out"), (["gan", "sample"], "--out"),
                                         (["repair", "run"], "--out"), (["repair", "evaluate"], "--examples")])
def test_every_output_files_help_says_that_an_existing_one_is_replaced(capsys, verb, option):
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{option} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    assert "replaced" in " ".join(" ".join(lines[start:end]).split())  # the option's own description


def test_evaluate_on_the_runs_data_moved_with_a_class_added_is_the_error_alone(tmp_path: Path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    moved = shutil.copytree(data, tmp_path / "moved")
    capsys.readouterr()
    assert main(["evaluate", str(out), str(moved), "--json"]) == 0  # found moved: said, and scored
    assert capsys.readouterr().err.splitlines()[0] == (
        f"warning: {moved} holds the data the run trained on ({data}), moved or copied: scoring the 3 images it held out")
    shutil.copytree(data / "square", moved / "circle")
    assert main(["evaluate", str(out), str(moved), "--json"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: {moved}: classes ['circle'] are not among the run's classes "
        "['square', 'stripes_h', 'stripes_v']"]
