"""Pretext data: a text corpus tokenised and cut into chunks of exactly ``k`` tokens (Sec. 7.1.1).

Sources: a ``.txt`` file or a directory of them, a ``datasets`` dataset saved with
``save_to_disk`` (column ``text``), or ``hub:<name>`` for ``datasets.load_dataset(name)`` streamed
from the hub (BooksCorpus is ``hub:bookcorpus``). Chunks are produced lazily, so a large corpus is
never held in memory as token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from recipes.common import check_shard

from .hub import MissingResourceError, hub_reachable


def chunk_tokens(
    texts: Iterable[str], tokenize: Callable[[str], list[int]], k: int
) -> Iterator[torch.Tensor]:
    """Yield consecutive chunks of ``k`` token ids of the concatenated texts (a tail is dropped)."""
    if k < 2:
        raise ValueError(f"chunks need at least 2 tokens for next-token prediction, got k={k}")
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenize(text))
        while len(buffer) >= k:
            yield torch.tensor(buffer[:k], dtype=torch.long)
            del buffer[:k]


class ChunkDataset(IterableDataset):
    """Re-iterable stream of ``k``-token chunks; ``texts`` is called anew for every pass.

    Args:
        texts: returns an iterable of documents.
        tokenize: text to ids.
        k: chunk length (the context window).
        max_chunks: stop a pass after this many chunks of the stream (``None``: the whole
            corpus). The corpus must hold at least this many chunks.
        shard: ``(rank, world_size)``: keep only the chunks whose index ``i`` in the stream has
            ``i % world_size == rank`` (a stream has no sampler to split it), so the ranks see
            disjoint chunks; the ``max_chunks`` of a pass are shared out evenly, a remainder
            dropped. Every rank still reads and tokenises the whole stream.
    """

    def __init__(
        self,
        texts: Callable[[], Iterable[str]],
        tokenize: Callable[[str], list[int]],
        k: int,
        max_chunks: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        rank, world = check_shard(shard)
        self.texts, self.tokenize, self.k, self.max_chunks = texts, tokenize, k, max_chunks
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = None if self.max_chunks is None else self.max_chunks // self.world * self.world
        chunks = islice(chunk_tokens(self.texts(), self.tokenize, self.k), stop)
        return islice(chunks, self.rank, None, self.world)

    def __len__(self) -> int:
        """This rank's chunks per pass, ``max_chunks // world_size`` (a pass must be sized for the
        BiSSL trainer's batch stacks)."""
        if self.max_chunks is None:
            raise TypeError("a ChunkDataset without max_chunks has no known length")
        return self.max_chunks // self.world


def text_source(source: str) -> Callable[[], Iterable[str]]:
    """Return a callable producing the documents of ``source`` (see the module docstring)."""
    if source.startswith("hub:"):
        name = source[4:]
        if not hub_reachable():
            raise MissingResourceError(
                f"pretext corpus {name!r}: the dataset hub is unreachable. Save it on a connected "
                f"machine with datasets.load_dataset({name!r}, split='train').save_to_disk(DIR), "
                "or pass a directory of .txt files"
            )

        def stream() -> Iterable[str]:
            import datasets

            for row in datasets.load_dataset(name, split="train", streaming=True):
                yield row["text"]

        return stream
    path = Path(source).expanduser()
    if path.is_file():
        return lambda: path.read_text(encoding="utf-8").split("\n\n")
    if path.is_dir() and (path / "dataset_info.json").is_file():
        import datasets

        data = datasets.load_from_disk(str(path))
        if "text" not in data.column_names:
            raise MissingResourceError(f"{path}: the saved dataset has no 'text' column")
        return lambda: (row["text"] for row in data)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if files:
            return lambda: (f.read_text(encoding="utf-8") for f in files)
    raise MissingResourceError(
        f"pretext corpus {source!r} not found: pass a .txt file, a directory of .txt files, a "
        "dataset saved with save_to_disk (column 'text') or hub:<name>"
    )
