"""Pretext data: a text corpus tokenised and cut into chunks of exactly ``k`` tokens (Sec. 7.1.1).

Sources: a ``.txt`` file or a directory of them, a ``datasets`` dataset saved with
``save_to_disk`` (column ``text``), or ``hub:<name>`` for ``datasets.load_dataset(name)`` streamed
from the hub (BooksCorpus is ``hub:bookcorpus``).

Chunk order. Algorithm 2 of the thesis draws random pretext batches, and pretraining visits the
corpus in random order. Chunks are therefore shuffled by **chunk-index permutation**
(:class:`TokenChunks` + :class:`ChunkOrderSampler`), not by a shuffle buffer over the stream:

- the corpus is tokenised once into one flat array of token ids (2 bytes a token for a vocabulary
  of at most 65536; optionally a file on disk, memory-mapped, that later runs reuse), so chunk
  ``i`` is the slice ``[i·k, (i+1)·k)`` of the concatenated text, exactly the chunks of
  :func:`chunk_tokens`;
- every epoch over the corpus is a permutation of all chunk indices, drawn from ``(seed, epoch)``.
  A batch is then a uniform draw from the whole corpus, as in Algorithm 2. A shuffle buffer of
  ``b`` chunks would only mix neighbouring chunks: a short run (BiSSL's lower level reads about
  0.12 of an epoch, Sec. 7.1.3) would still see only the first books, for every task and seed;
- the order is a pure function of ``(seed, pass, rank, world_size)``, so it needs no random state
  to be saved: a :class:`~implicitbilevel.bissl.BatchStack` sets the pass (``set_epoch``)
  before each ``iter(loader)``, also on resume, and draws exactly the batches it drew before.

The price is one full tokenisation pass before the first batch (which a streamed in-order corpus
avoids). :class:`ChunkDataset` keeps the in-order stream for when that is preferred.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from recipes.common import check_shard
from recipes.common.runtime import derive_seed

from .glue import read_utf8
from .hub import MissingResourceError, hub_reachable

ENCODE_BATCH = 1024
"""Texts tokenised per call when the tokenizer encodes batches."""


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
    """Re-iterable stream of ``k``-token chunks in corpus order; ``texts`` is called anew for every
    pass (no shuffling: see the module docstring and :class:`TokenChunks`).

    Args:
        texts: returns an iterable of documents.
        tokenize: text to ids.
        k: chunk length (the context window).
        max_chunks: stop a pass after this many chunks of the stream (``None``: the whole
            corpus). A corpus with fewer chunks is read again from its start to fill the pass.
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

    def _stream(self) -> Iterator[torch.Tensor]:
        if self.max_chunks is None:
            yield from chunk_tokens(self.texts(), self.tokenize, self.k)
            return
        while True:  # a corpus shorter than the pass is read again
            empty = True
            for chunk in chunk_tokens(self.texts(), self.tokenize, self.k):
                empty = False
                yield chunk
            if empty:
                raise ValueError(f"the pretext corpus holds no chunk of {self.k} tokens")

    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = None if self.max_chunks is None else self.max_chunks // self.world * self.world
        return islice(self._stream(), self.rank, stop, self.world)

    def __len__(self) -> int:
        """This rank's chunks per pass, ``max_chunks // world_size`` (a pass must be sized for the
        BiSSL trainer's batch stacks)."""
        if self.max_chunks is None:
            raise TypeError("a ChunkDataset without max_chunks has no known length")
        return self.max_chunks // self.world


# --------------------------------------------------------------------------- shuffled chunks


def _token_dtype(vocab_size: int | None) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else np.int32)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(islice(it, size)):
        yield batch


def _encode_all(
    texts: Iterable[str], tokenize: Callable[[str], list[int]]
) -> Iterator[list[int]]:
    """Token ids of every text, in order; batched when ``tokenize`` has an ``encode_batch``
    (a :class:`.tokenizer.TextEncoder`), which gives the same ids faster."""
    many = getattr(tokenize, "encode_batch", None)
    if many is None:
        for text in texts:
            yield tokenize(text)
        return
    for batch in _batches(texts, ENCODE_BATCH):
        yield from many(batch)


def tokenize_corpus(
    texts: Iterable[str],
    tokenize: Callable[[str], list[int]],
    *,
    vocab_size: int | None = None,
    path: str | Path | None = None,
) -> np.ndarray:
    """The token ids of the concatenated ``texts`` as one flat array.

    Args:
        texts: the documents, in corpus order.
        tokenize: text to ids (batched when it offers ``encode_batch``).
        vocab_size: ids are stored as ``uint16`` when it is at most 65536, else ``int32``.
        path: write the ids to this file (through a temporary file and ``os.replace``) and return
            it memory-mapped, so a corpus larger than the memory works; ``None``: in memory.
    """
    dtype = _token_dtype(vocab_size)
    code = "H" if dtype == np.uint16 else "i"
    if path is None:
        ids = array(code)
        for piece in _encode_all(texts, tokenize):
            ids.extend(piece)
        return np.frombuffer(ids, dtype=dtype) if len(ids) else np.zeros(0, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            ids = array(code)
            for piece in _encode_all(texts, tokenize):
                ids.extend(piece)
                if len(ids) >= 1 << 24:
                    ids.tofile(out)
                    ids = array(code)
            ids.tofile(out)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class TokenChunks(Dataset):
    """Map-style dataset of the ``k``-token chunks of a flat token array: item ``i`` is
    ``tokens[i·k:(i+1)·k]`` as a ``torch.long`` tensor (the tail short of ``k`` is dropped), the
    same chunks :func:`chunk_tokens` yields in order."""

    def __init__(self, tokens: np.ndarray, k: int) -> None:
        if k < 2:
            raise ValueError(f"chunks need at least 2 tokens for next-token prediction, got k={k}")
        self.tokens, self.k = tokens, k

    def __len__(self) -> int:
        return len(self.tokens) // self.k

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} of {len(self)}")
        piece = np.asarray(self.tokens[i * self.k : (i + 1) * self.k], dtype=np.int64)
        return torch.from_numpy(piece)


class ChunkOrderSampler(Sampler[int]):
    """Seeded, sharded, resumable order of chunk indices (see the module docstring).

    The chunks form one endless stream: corpus epoch ``e`` is a permutation of ``range(n)`` drawn
    from ``derive_seed(seed, e)``, and the epochs follow each other. Pass ``p`` of the loader is
    the stretch ``[p·P, (p+1)·P)`` of that stream, ``P = samples_per_rank · world_size``, so a
    new pass continues with chunks not seen yet and reshuffles when the corpus is used up; a
    corpus shorter than a pass is simply begun again (in a new order) inside the pass. Rank ``r``
    takes the stream positions ``≡ r (mod world_size)`` of each pass: the ranks' shares are
    disjoint and together cover the pass, and the ranks' ``b``-th batches together are one
    contiguous stretch of the stream, the batch a single process with the global batch size
    would draw.

    ``set_epoch(p)`` chooses the pass the next ``iter()`` yields (a
    :class:`~implicitbilevel.bissl.BatchStack` calls it before every pass and on resume);
    without it a pass follows the previous one (0 first).

    Args:
        num_chunks: ``n``, the number of chunks of the corpus.
        samples_per_rank: indices this rank draws per pass (``num_batches · batch_size``).
        seed: selects the order; the same seed gives the same order.
        shard: ``(rank, world_size)`` or ``None``.
    """

    def __init__(
        self,
        num_chunks: int,
        samples_per_rank: int,
        *,
        seed: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if num_chunks < 1:
            raise ValueError("the pretext corpus holds no chunk")
        if samples_per_rank < 1:
            raise ValueError(f"samples_per_rank must be positive, got {samples_per_rank}")
        self.rank, self.world = check_shard(shard)
        self.num_chunks, self.samples_per_rank, self.seed = num_chunks, samples_per_rank, seed
        self._epoch: int | None = None
        self._next = 0

    def __len__(self) -> int:
        return self.samples_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield pass ``epoch``."""
        self._epoch = int(epoch)

    def permutation(self, corpus_epoch: int) -> torch.Tensor:
        """The chunk order of corpus epoch ``corpus_epoch`` (all ranks agree on it)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, corpus_epoch))
        return torch.randperm(self.num_chunks, generator=gen)

    def _segments(self, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's chunk indices of pass ``epoch``, one tensor per corpus epoch it touches
        (so a long pass over a small corpus is never held whole)."""
        n, w = self.num_chunks, self.world
        first = epoch * self.samples_per_rank * w + self.rank  # stream position of j = 0
        last = first + (self.samples_per_rank - 1) * w
        for e in range(first // n, last // n + 1):
            lo = max(0, -(-(e * n - first) // w))  # first j whose position lies in epoch e
            hi = min(self.samples_per_rank, -(-((e + 1) * n - first) // w))
            if lo < hi:
                positions = first + torch.arange(lo, hi) * w - e * n
                yield self.permutation(e)[positions]

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's chunk indices of pass ``epoch``, in order."""
        return torch.cat(list(self._segments(epoch)))

    def __iter__(self) -> Iterator[int]:
        epoch = self._next if self._epoch is None else self._epoch
        self._epoch, self._next = None, epoch + 1
        return (int(i) for segment in self._segments(epoch) for i in segment.tolist())


# --------------------------------------------------------------------------- sources


def text_source(source: str) -> Callable[[], Iterable[str]]:
    """Return a callable producing the documents of ``source`` (see the module docstring).

    Text files are read as UTF-8 (a byte-order mark dropped); one that is not raises
    ``ValueError`` naming the file and line when it is read."""
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
        return lambda: read_utf8(path).split("\n\n")
    if path.is_dir() and (path / "dataset_info.json").is_file():
        import datasets

        data = datasets.load_from_disk(str(path))
        if "text" not in data.column_names:
            raise MissingResourceError(f"{path}: the saved dataset has no 'text' column")
        return lambda: (row["text"] for row in data)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if files:
            return lambda: (read_utf8(f) for f in files)
    raise MissingResourceError(
        f"pretext corpus {source!r} not found: pass a .txt file, a directory of .txt files, a "
        "dataset saved with save_to_disk (column 'text') or hub:<name>"
    )


def source_fingerprint(source: str) -> str:
    """A digest of ``source`` that changes when its files do (names, sizes, modification times);
    a hub name is taken as it is."""
    parts: list[str] = [source]
    if not source.startswith("hub:"):
        path = Path(source).expanduser().resolve()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            parts.append(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:"
                         f"{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_corpus_tokens(
    source: str,
    tokenize: Callable[[str], list[int]],
    *,
    vocab_size: int | None,
    tokenizer_id: str,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """The token ids of corpus ``source`` (:func:`tokenize_corpus`), read from ``cache_dir`` when
    an earlier run with the same corpus files and tokenizer (``tokenizer_id``) wrote them there,
    else tokenised (and written there when ``cache_dir`` is given).

    The cache file is ``pretext-<digest>.tokens`` with a ``.json`` description next to it. Ranks
    of a distributed run may build it at the same time (each writes its own temporary file); to
    tokenise once, call this on rank 0, then a barrier, then on the others.
    """
    if cache_dir is None:
        return tokenize_corpus(text_source(source)(), tokenize, vocab_size=vocab_size)
    dtype = _token_dtype(vocab_size)
    key = hashlib.sha256(
        f"{source_fingerprint(source)}\n{tokenizer_id}\n{dtype.str}".encode()
    ).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"pretext-{key}.tokens"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    tokens = tokenize_corpus(text_source(source)(), tokenize, vocab_size=vocab_size, path=path)
    info = {"source": source, "tokenizer": tokenizer_id[:200], "dtype": dtype.str,
            "tokens": int(len(tokens))}
    tmp = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, meta)
    return tokens
