"""Labelling collections: stream rows batch by batch, and write them as a table, CSV or JSON lines.

Memory holds one batch of decoded images at a time; rows are written (and flushed) as each batch is
done, so a folder of a million files runs in flat memory and a long run shows progress as it goes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from visionflow.data.loading import stream_batches
from visionflow.data.sources import DataSource
from visionflow.errors import VisionflowError
from visionflow.infer.predictor import Predictor

FORMATS = ("table", "csv", "jsonl")
CSV_HEADER = ["path", "label", "score", "top_k", "error"]
# The table is one line per row, its fields split by tabs: a tab, newline or other control character in a file name
# is written escaped as Python writes it in a string (\t, \n, \x1b), so that it cannot split a row or a field. CSV
# and JSON lines quote names instead, and keep them as they are.
_VISIBLE_CONTROLS = {code: {9: "\\t", 10: "\\n", 13: "\\r"}.get(code, f"\\x{code:02x}") for code in (*range(32), 127)}


@dataclass
class LabelledRows:
    """`predict`'s rows as batches finish (an iterator), how many there will be, and what labels them: the
    predictor's engine, precision and device, for a caller to say; `failed`: how many of the rows so far are error
    rows (the CLI exits 2 when every one is)."""

    rows: Iterator[dict]
    engine: str
    precision: str
    device: str
    total: int  # rows to come: one per input listed (a progress bar's length, without listing the inputs again)
    failed: int = 0

    def __iter__(self) -> "LabelledRows":
        return self

    def __next__(self) -> dict:
        row = next(self.rows)
        self.failed += row["error"] is not None
        return row


def predict_rows(predictor: Predictor, source: DataSource, top_k: int = 5, batch_size: int = 64,
                 on_batch=None, strict: bool = False) -> Iterator[dict]:
    """One row per item: path, label, score, top_k [{label, score}], error (None unless unreadable; with
    `strict` an unreadable item stops the labelling instead)."""
    size = predictor.preprocess.image_size
    for decoded, images, broken in stream_batches(source, predictor.preprocess.channels, size, batch_size, strict=strict):
        origins = [source.origin(i) for i in decoded]
        rows = []
        if images is not None:
            scores, classes = predictor.top_k(images, top_k)
            for origin, row_scores, row_indices in zip(origins, scores.tolist(), classes.tolist()):
                top = [{"label": predictor.classes[i], "score": round(s, 6)} for s, i in zip(row_scores, row_indices)]
                rows.append({"path": origin, "label": top[0]["label"], "score": top[0]["score"], "top_k": top, "error": None})
        for place, item in broken:  # in ascending places: each goes back where it was among the inputs
            rows.insert(place, {"path": item.origin, "label": None, "score": None, "top_k": [], "error": item.reason})
        yield from rows
        if on_batch is not None:
            on_batch(len(origins) + len(broken))


def write_rows(rows: Iterable[dict], out: IO[str], fmt: str, header: bool = True) -> int:
    """Write rows as they come; returns how many were written. `header`: CSV's first line (not when appending)."""
    if fmt not in FORMATS:
        raise VisionflowError(f"--format must be one of {', '.join(FORMATS)} (got {fmt})")
    count = 0
    if fmt == "csv":
        writer = csv.writer(out)
        if header:
            writer.writerow(CSV_HEADER)
    for row in rows:
        if fmt == "jsonl":
            out.write(json.dumps(row) + "\n")
        elif fmt == "csv":
            top = ";".join(f"{t['label']}:{t['score']:.4f}" for t in row["top_k"])
            writer.writerow([row["path"], row["label"] or "", "" if row["score"] is None else f"{row['score']:.6f}",
                             top, row["error"] or ""])
        else:
            path = row["path"].translate(_VISIBLE_CONTROLS)
            if row["error"]:
                out.write(f"{path}\tERROR\t{row['error'].translate(_VISIBLE_CONTROLS)}\n")
            else:
                top = "  ".join(f"{t['label']} {t['score']:.3f}" for t in row["top_k"][1:])
                out.write(f"{path}\t{row['label']}\t{row['score']:.4f}\t{top}\n")
        count += 1
        if count % 256 == 0:
            out.flush()
    out.flush()
    return count


def labelled_paths(output: str, fmt: str) -> set[str]:
    """The paths an earlier `predict --output` wrote a row for (error rows too), so that `--resume` labels only the
    others and appends. A last row cut short (the writer killed mid-line) is cut off the file, to be written again;
    a file that is not predict's rows in `fmt` is refused before anything in it changes."""
    if fmt not in ("csv", "jsonl"):
        raise VisionflowError(f"--resume reads back the rows in --output: it needs --format csv or jsonl (got {fmt})")
    if not os.path.exists(output):
        return set()
    with open(output, "rb") as f:
        data = f.read()
    end = b"\r\n" if fmt == "csv" else b"\n"  # csv.writer ends rows with \r\n; a \n alone may be inside a name
    complete = data[:data.rfind(end) + len(end)] if end in data else b""
    text = complete.decode("utf-8", errors="surrogateescape")
    start = (",".join(CSV_HEADER) + "\r\n").encode() if fmt == "csv" else b'{"path": '
    try:
        if data and not data.startswith(start):  # what is cut off as torn must follow predict's own first line
            raise ValueError(f"it does not start with {start.decode()!r}")
        if fmt == "csv":
            table = list(csv.reader(io.StringIO(text, newline="")))
            if any(len(row) != len(CSV_HEADER) for row in table):  # the header itself is checked above
                raise ValueError("not predict's CSV columns")
            paths = {row[0] for row in table[1:]}
        else:
            paths = {json.loads(line)["path"] for line in text.split("\n") if line}
    except (ValueError, TypeError, KeyError, csv.Error) as exc:
        raise VisionflowError(f"{output}: not rows that predict wrote as {fmt}, nothing to resume ({exc})") from None
    if len(complete) < len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    return paths
