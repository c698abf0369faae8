"""GLUE task descriptions and GPT input formatting (thesis Sec. 7.1.1).

Three task types, each with its own layout built from the start ``s``, delimiter ``d`` and end ``e``
tokens:

- classification (CoLA, SST2): ``[s, x, e]``;
- entailment (RTE, QNLI): ``[s, premise, d, hypothesis, e]``;
- similarity (MRPC, QQP, STSB): both orders ``[s, a, d, b, e]`` and ``[s, b, d, a, e]``, run through
  the transformer separately and summed before the head.

The special tokens do not exist in the pretrained vocabulary of size ``V``: they get the ids
``V, V+1(, V+2)``, whose embedding rows belong to the downstream head (see :mod:`.model`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TaskKind = Literal["classification", "entailment", "similarity"]
PAD_ID = 0
"""Id written into padded positions; they are never attended to by real tokens (causal attention,
right padding) and never used as targets."""


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its type, output size, metric, text columns and head warm-up length."""

    name: str
    kind: TaskKind
    num_outputs: int
    metric: Literal["mcc", "accuracy", "f1", "pearson"]
    text_fields: tuple[str, ...]
    head_warmup_epochs: float

    @property
    def is_regression(self) -> bool:
        """``True`` for STSB (one output, MSE loss)."""
        return self.num_outputs == 1

    @property
    def num_views(self) -> int:
        """Sequences per example: 2 for similarity tasks (both orders), else 1."""
        return 2 if self.kind == "similarity" else 1

    @property
    def num_special_tokens(self) -> int:
        """``V_D``: 2 (start, end) for classification, 3 (plus delimiter) for the pair tasks."""
        return 2 if self.kind == "classification" else 3


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "classification", 2, "mcc", ("sentence",), 0.5),
    "sst2": TaskSpec("sst2", "classification", 2, "accuracy", ("sentence",), 0.1),
    "rte": TaskSpec("rte", "entailment", 2, "accuracy", ("sentence1", "sentence2"), 0.5),
    "qnli": TaskSpec("qnli", "entailment", 2, "accuracy", ("question", "sentence"), 0.1),
    "mrpc": TaskSpec("mrpc", "similarity", 2, "f1", ("sentence1", "sentence2"), 0.5),
    "qqp": TaskSpec("qqp", "similarity", 2, "f1", ("question1", "question2"), 0.1),
    "stsb": TaskSpec("stsb", "similarity", 1, "pearson", ("sentence1", "sentence2"), 0.5),
}


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of ``name`` (case-insensitive) or raise with the known names."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[key]


def resolve_tasks(names: Sequence[str], key: str = "data.tasks") -> list[TaskSpec]:
    """The :class:`TaskSpec` of every name, in order; ``ValueError`` naming ``key`` when the list
    is empty, a name is unknown, or two names are one task (``rte``, ``RTE`` and ``R-TE`` alike:
    a task run twice, under two names)."""
    if not names:
        raise ValueError(f"{key} is empty: name at least one GLUE task of {sorted(TASKS)}")
    specs, seen = [], {}
    for name in names:
        spec = get_task(name)
        if spec.name in seen:
            raise ValueError(f"{key} names GLUE task {spec.name!r} twice ({seen[spec.name]!r} and "
                             f"{name!r}): list each task once")
        seen[spec.name] = name
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the start, delimiter and end tokens appended after a vocabulary of ``base_vocab``."""

    base_vocab: int

    @property
    def start(self) -> int:
        """``s``: id ``V``."""
        return self.base_vocab

    @property
    def end(self) -> int:
        """``e``: id ``V + 1``."""
        return self.base_vocab + 1

    @property
    def delimiter(self) -> int:
        """``d``: id ``V + 2`` (pair tasks only)."""
        return self.base_vocab + 2


def format_example(
    spec: TaskSpec, a: Sequence[int], b: Sequence[int] | None, tokens: SpecialTokens
) -> list[list[int]]:
    """Return the model input sequence(s) of one tokenised example.

    Args:
        spec: the task.
        a: token ids of the first text (sentence, premise, question or first sentence).
        b: token ids of the second text (``None`` for classification tasks).
        tokens: the special token ids.

    Returns:
        One sequence (classification, entailment) or two, one per sentence order (similarity).
    """
    s, d, e = tokens.start, tokens.delimiter, tokens.end
    if spec.kind == "classification":
        if b is not None:
            raise ValueError(f"{spec.name} takes one text per example, got two")
        return [[s, *a, e]]
    if b is None:
        raise ValueError(f"{spec.name} takes two texts per example, got one")
    if spec.kind == "entailment":
        return [[s, *a, d, *b, e]]
    return [[s, *a, d, *b, e], [s, *b, d, *a, e]]


@dataclass
class EncodedTask:
    """A tokenised split: ``input_ids`` (n, views, L) right-padded, ``lengths`` (n, views),
    ``labels`` (n,), and the number of examples dropped for exceeding the context window."""

    input_ids: Tensor
    lengths: Tensor
    labels: Tensor
    dropped: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_split(
    spec: TaskSpec,
    texts_a: Sequence[str],
    texts_b: Sequence[str] | None,
    labels: Sequence[float],
    tokenize: Callable[[str], list[int]],
    tokens: SpecialTokens,
    context: int,
) -> EncodedTask:
    """Tokenise, format and pad one split.

    Examples whose formatted sequence is longer than ``context`` are dropped (their count is kept
    in ``dropped``); the rest are right-padded to the longest kept sequence. Right padding under
    causal attention leaves every real position unchanged, so this equals padding to ``context``.
    """
    if texts_b is not None and len(texts_b) != len(texts_a):
        raise ValueError(f"{len(texts_a)} first texts but {len(texts_b)} second texts")
    if len(labels) != len(texts_a):
        raise ValueError(f"{len(texts_a)} texts but {len(labels)} labels")
    kept: list[list[list[int]]] = []
    kept_labels: list[float] = []
    for i, text in enumerate(texts_a):
        second = tokenize(texts_b[i]) if texts_b is not None else None
        views = format_example(spec, tokenize(text), second, tokens)
        if max(len(v) for v in views) <= context:
            kept.append(views)
            kept_labels.append(labels[i])
    if not kept:
        raise ValueError(f"{spec.name}: no example fits the context window of {context} tokens")
    width = max(len(v) for views in kept for v in views)
    ids = torch.full((len(kept), spec.num_views, width), PAD_ID, dtype=torch.long)
    lengths = torch.zeros((len(kept), spec.num_views), dtype=torch.long)
    for i, views in enumerate(kept):
        for j, v in enumerate(views):
            ids[i, j, : len(v)] = torch.tensor(v, dtype=torch.long)
            lengths[i, j] = len(v)
    dtype = torch.float32 if spec.is_regression else torch.long
    labels_tensor = torch.tensor(kept_labels, dtype=dtype)
    return EncodedTask(ids, lengths, labels_tensor, len(texts_a) - len(kept))
