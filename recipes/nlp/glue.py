"""GLUE loading: ``datasets`` from the hub, a saved ``DatasetDict``, or the original TSV files.

Splits follow thesis Sec. 7.1.1: GLUE's validation split is the test set; the first 80% of GLUE's
train split (in the published order) is used for training and the remaining 20% for validation.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .hub import MissingResourceError, hub_reachable
from .tasks import TaskSpec

TSV_DIRS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "rte": "RTE",
    "qnli": "QNLI",
    "mrpc": "MRPC",
    "qqp": "QQP",
    "stsb": "STS-B",
}
TSV_COLUMNS = {  # (first text, second text, label) columns of the original GLUE TSV files
    "sst2": ("sentence", None, "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "qnli": ("question", "sentence", "label"),
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "qqp": ("question1", "question2", "is_duplicate"),
    "stsb": ("sentence1", "sentence2", "score"),
}
TEXT_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass
class RawSplit:
    """Untokenised examples: first texts, second texts (``None`` for one-text tasks), labels."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> RawSplit:
        """Examples ``start:stop`` in order."""
        b = self.texts_b[start:stop] if self.texts_b is not None else None
        return RawSplit(self.texts_a[start:stop], b, self.labels[start:stop])


def train_validation_split(train: RawSplit, fraction: float = 0.8) -> tuple[RawSplit, RawSplit]:
    """First ``fraction`` of ``train`` for training, the rest for validation, order kept."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    cut = int(round(fraction * len(train)))
    if cut == 0 or cut == len(train):
        raise ValueError(f"{len(train)} training examples are too few to split {fraction:.0%}")
    return train.slice(0, cut), train.slice(cut, len(train))


def _from_rows(spec: TaskSpec, rows: list[dict], label_key: str = "label") -> RawSplit:
    a = [str(r[spec.text_fields[0]]) for r in rows]
    b = [str(r[spec.text_fields[1]]) for r in rows] if len(spec.text_fields) > 1 else None
    labels = [float(r[label_key]) if spec.is_regression else int(r[label_key]) for r in rows]
    return RawSplit(a, b, labels)


def _from_datasets(spec: TaskSpec, dataset_dict) -> tuple[RawSplit, RawSplit]:
    for split in ("train", "validation"):
        if split not in dataset_dict:
            raise MissingResourceError(
                f"{spec.name}: the saved dataset has splits {list(dataset_dict)}, "
                "needs 'train' and 'validation'"
            )
    return (
        _from_rows(spec, list(dataset_dict["train"])),
        _from_rows(spec, list(dataset_dict["validation"])),
    )


def _label(spec: TaskSpec, raw: str, where: str, column: str) -> float | int:
    """One label of ``spec``, or ``ValueError`` naming ``where`` (file:line) and ``column``."""
    value = TEXT_LABELS.get(raw, raw)
    try:
        if spec.is_regression:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        label = int(value)
    except (TypeError, ValueError):
        kind = "a finite number" if spec.is_regression else "an integer class"
        raise ValueError(f"{where}: column {column!r} holds {raw!r}, expected {kind} "
                         f"(GLUE {spec.name})") from None
    if not 0 <= label < spec.num_outputs:
        raise ValueError(f"{where}: column {column!r} holds class {label}, expected 0 to "
                         f"{spec.num_outputs - 1} (GLUE {spec.name})")
    return label


def _read_tsv(spec: TaskSpec, path: Path) -> RawSplit:
    """The examples of one GLUE TSV file (UTF-8, a byte-order mark dropped); ``ValueError``
    naming the file and line of a byte that is not UTF-8, of a row with a missing or an extra
    field, of a missing column or of a bad label, or naming the file when it holds no example."""
    split = _parse_tsv(spec, path)
    if len(split) == 0:
        raise ValueError(f"{path} holds no {spec.name} example (an empty file, or a header "
                         "alone): point data.glue at the unpacked GLUE folders")
    return split


def read_utf8(path: Path, *, newline: str | None = None) -> str:
    """The text of ``path`` decoded as UTF-8, a leading byte-order mark dropped; ``ValueError``
    naming the file and line of the first byte that is not UTF-8. ``newline`` as for ``open``:
    ``None`` turns ``\\r\\n`` and ``\\r`` into ``\\n``, ``""`` leaves line ends as they are."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}: "
                         f"{err.reason}); save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if newline is None else text


def _fields(row: list[str], expected: int, where: str, what: str) -> None:
    """``ValueError`` naming ``where`` (file:line) unless ``row`` has ``expected`` fields."""
    if len(row) != expected:
        why = ("a field is missing" if len(row) < expected
               else "there are extra fields (a tab inside a text?)")
        raise ValueError(f"{where}: {len(row)} tab-separated fields, expected {expected} ({what}): "
                         f"{why}, so the columns cannot be told apart")


def _parse_tsv(spec: TaskSpec, path: Path) -> RawSplit:
    csv.field_size_limit(sys.maxsize)
    handle = io.StringIO(read_utf8(path, newline=""), newline="")
    reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    if spec.name == "cola":  # no header: source, label, original label, sentence
        a, labels = [], []
        for r in reader:
            if not r:
                continue  # a blank line
            where = f"{path}:{reader.line_num}"
            _fields(r, 4, where, "CoLA: source, label, original label, sentence")
            labels.append(_label(spec, r[1], where, "label (column 2)"))
            a.append(r[3])
        return RawSplit(a, None, labels)
    header = next(reader, [])
    first, second, label = TSV_COLUMNS[spec.name]
    missing = [c for c in (first, second, label) if c is not None and c not in header]
    if missing:
        raise ValueError(f"{path}:1: GLUE {spec.name} needs the columns {missing}, the "
                         f"header has {header}")
    at = {name: header.index(name) for name in (first, second, label) if name is not None}
    a, b, labels = [], [], []
    for r in reader:
        if not r:
            continue  # a blank line
        where = f"{path}:{reader.line_num}"
        _fields(r, len(header), where, f"the header's {header}")
        labels.append(_label(spec, r[at[label]], where, label))
        a.append(r[at[first]])
        if second is not None:
            b.append(r[at[second]])
    return RawSplit(a, b if second is not None else None, labels)


def load_glue_task(spec: TaskSpec, source: str) -> tuple[RawSplit, RawSplit]:
    """Return ``(train, test)`` of a GLUE task, ``test`` being GLUE's validation split.

    Args:
        spec: the task.
        source: ``"hub"`` for ``datasets.load_dataset("glue", task)`` (needs network), or a
            directory holding either ``<task>/`` saved with ``DatasetDict.save_to_disk`` or the
            original GLUE layout ``<CoLA|SST-2|RTE|QNLI|MRPC|QQP|STS-B>/{train,dev}.tsv``.

    Raises:
        MissingResourceError: naming what is missing and how to provide it.
    """
    import datasets

    if source == "hub":
        if not hub_reachable():
            raise MissingResourceError(
                f"GLUE {spec.name}: the dataset hub is unreachable. On a connected machine run "
                f"datasets.load_dataset('glue', '{spec.name}').save_to_disk('GLUE/{spec.name}') "
                "(or download the original GLUE TSV files) and pass --set data.glue=GLUE"
            )
        return _from_datasets(spec, datasets.load_dataset("glue", spec.name))
    root = Path(source).expanduser()
    saved = root / spec.name
    if saved.is_dir():
        return _from_datasets(spec, datasets.load_from_disk(str(saved)))
    tsv = root / TSV_DIRS[spec.name]
    if (tsv / "train.tsv").is_file() and (tsv / "dev.tsv").is_file():
        return _read_tsv(spec, tsv / "train.tsv"), _read_tsv(spec, tsv / "dev.tsv")
    raise MissingResourceError(
        f"GLUE {spec.name}: found neither {saved}/ (a DatasetDict saved with save_to_disk) nor "
        f"{tsv}/train.tsv and dev.tsv (the original GLUE files) under {root}. Provide one of them, "
        "or pass --set data.glue=hub on a machine with network access"
    )
