"""Assemble the recipe's data: tokenizer, encoded GLUE splits and the pretext chunk loader.

``glue: embedded`` and ``corpus: embedded`` use :mod:`.synthetic` (nothing downloaded); anything
else goes through :mod:`.glue` and :mod:`.corpus`, which raise a clear error naming what is
missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from recipes.common import check_shard

from .config import DataConfig, ModelConfig
from .corpus import (
    ChunkDataset,
    ChunkOrderSampler,
    TokenChunks,
    cached_corpus_tokens,
    source_fingerprint,
    text_source,
    tokenize_corpus,
)
from .glue import RawSplit, load_glue_task, train_validation_split
from .synthetic import pretext_corpus, synthetic_task
from .tasks import EncodedTask, SpecialTokens, TaskSpec, encode_split, get_task, resolve_tasks
from .tokenizer import TextEncoder, load_pretrained_tokenizer, train_bpe


@dataclass
class TaskData:
    """One task's encoded train / validation / test splits (test = GLUE validation)."""

    spec: TaskSpec
    train: EncodedTask
    val: EncodedTask
    test: EncodedTask

    @property
    def dropped(self) -> int:
        """Examples dropped for exceeding the context window, over all splits."""
        return self.train.dropped + self.val.dropped + self.test.dropped


def make_tokenizer(model: ModelConfig, data: DataConfig, expected_vocab: int | None) -> TextEncoder:
    """The pretrained tokenizer when one is configured, else a BPE trained on the pretext corpus
    (``model.bpe_vocab`` tokens at most; the embedded run).

    ``model.tokenizer`` names the tokenizer; unset, it is ``model.pretrained``'s directory. For
    OpenAI-GPT weights that is the thesis's ``OpenAIGPTTokenizer`` (Sec. 7.1.1), loaded from the
    same directory and checked against ``expected_vocab`` (pass the model's
    ``config.vocab_size``) by :func:`.tokenizer.load_pretrained_tokenizer`.
    """
    reference = model.tokenizer if model.tokenizer is not None else model.pretrained
    if reference is not None:
        return load_pretrained_tokenizer(reference, expected_vocab)
    if data.corpus != "embedded":
        texts = list(text_source(data.corpus)())
    else:
        texts = pretext_corpus(data.embedded_corpus_sentences, seed=0)
    return train_bpe(texts, model.bpe_vocab)


def _encode(spec: TaskSpec, split: RawSplit, encoder: TextEncoder, context: int) -> EncodedTask:
    tokens = SpecialTokens(encoder.vocab_size)
    return encode_split(spec, split.texts_a, split.texts_b, split.labels, encoder, tokens, context)


def load_task(name: str, data: DataConfig, encoder: TextEncoder, context: int) -> TaskData:
    """Load (embedded or real), split 80/20 in order and encode one task; ``ValueError`` when
    ``data.tasks``, the run's list, is empty or names a task twice (see
    :func:`.tasks.resolve_tasks`)."""
    resolve_tasks(data.tasks)
    spec = get_task(name)
    if data.glue == "embedded":
        train_raw, test_raw = synthetic_task(
            spec.name,
            data.embedded_train,
            data.embedded_test,
            seed=0,
            label_noise=data.embedded_label_noise,
        )
    else:
        train_raw, test_raw = load_glue_task(spec, data.glue)
    train_raw, val_raw = train_validation_split(train_raw, data.train_fraction)
    return TaskData(
        spec,
        _encode(spec, train_raw, encoder, context),
        _encode(spec, val_raw, encoder, context),
        _encode(spec, test_raw, encoder, context),
    )


_TOKENS: dict[tuple[str, ...], np.ndarray] = {}
"""The token ids of the last pretext corpus tokenised in this process (one entry), so the loaders
of several stages and tasks share one tokenisation."""


def pretext_chunks(
    data: DataConfig,
    encoder: TextEncoder,
    context: int,
    *,
    cache_dir: str | Path | None = None,
) -> TokenChunks:
    """All ``context``-token chunks of the pretext corpus, indexable (see :mod:`.corpus`).

    The embedded corpus is tokenised in memory; another corpus is tokenised once in full, into
    ``cache_dir`` when given (memory-mapped and reused by later runs with the same corpus files and
    tokenizer), else into memory (2 bytes a token for GPT's vocabulary). Either way the ids are
    kept for the next call in this process with the same corpus and tokenizer.
    """
    tokenizer_id = _tokenizer_id(encoder)
    if data.corpus == "embedded":
        key = ("embedded", str(data.embedded_corpus_sentences), tokenizer_id)
    else:
        key = (data.corpus, source_fingerprint(data.corpus), tokenizer_id)
    tokens = _TOKENS.get(key)
    if tokens is None:
        if data.corpus == "embedded":
            paragraphs = pretext_corpus(data.embedded_corpus_sentences, seed=1)
            tokens = tokenize_corpus(paragraphs, encoder, vocab_size=encoder.vocab_size)
        else:
            tokens = cached_corpus_tokens(
                data.corpus,
                encoder,
                vocab_size=encoder.vocab_size,
                tokenizer_id=tokenizer_id,
                cache_dir=cache_dir,
            )
        _TOKENS.clear()
        _TOKENS[key] = tokens
    return TokenChunks(tokens, context)


def pretext_loader(
    data: DataConfig,
    encoder: TextEncoder,
    context: int,
    batch_size: int,
    num_batches: int | None,
    *,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    cache_dir: str | Path | None = None,
    chunks: TokenChunks | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A re-iterable loader of ``batch_size`` × ``context`` token chunks of the pretext corpus.

    Every pass holds ``num_batches`` batches (``None``: one epoch of the corpus, the remainder
    dropped), so it can be sized for the BiSSL trainer's batch stack.

    With ``shuffle`` (the default) the chunk order is drawn by :class:`.corpus.ChunkOrderSampler`
    from ``seed``: random chunks of the whole corpus (Algorithm 2), the same order for the same
    seed, a new stretch of the order (reshuffled every corpus epoch) for every pass, a corpus
    shorter than a pass begun again inside it, and an exact replay on resume (the stack sets the
    pass with ``set_epoch``). The corpus is tokenised in full first (:func:`pretext_chunks`;
    pass ``chunks`` to reuse one tokenisation for several loaders).

    With ``shuffle=False`` a non-embedded corpus is streamed in corpus order
    (:class:`.corpus.ChunkDataset`, no full tokenisation; read again from its start when shorter
    than a pass); the embedded corpus is always shuffled.

    With ``shard=(rank, world_size)`` each rank gets its own disjoint part of every pass and
    ``batch_size`` is the per-rank batch; a pass still holds ``num_batches`` batches on every rank.
    ``loader_kwargs`` go to the ``DataLoader`` (workers, pinned memory).
    """
    rank, world = check_shard(shard)
    if not shuffle and data.corpus != "embedded":
        if num_batches is None:
            raise ValueError("a streamed (shuffle=False) corpus needs num_batches")
        dataset = ChunkDataset(
            text_source(data.corpus),
            encoder,
            context,
            max_chunks=num_batches * batch_size * world,
            shard=shard,
        )
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, **loader_kwargs)
    if chunks is None:
        chunks = pretext_chunks(data, encoder, context, cache_dir=cache_dir)
    if len(chunks) < batch_size * world:
        raise ValueError(
            f"the pretext corpus gives {len(chunks)} chunks of {context} tokens, "
            f"fewer than one batch of {batch_size * world}: use a larger data.corpus, or lower "
            "model.context or the batch size (pretrain.batch_size, bissl.lower_batch_size)"
        )
    if num_batches is None:
        num_batches = len(chunks) // (batch_size * world)
    sampler = ChunkOrderSampler(
        len(chunks), num_batches * batch_size, seed=seed, shard=(rank, world)
    )
    return DataLoader(chunks, batch_size, sampler=sampler, drop_last=True, **loader_kwargs)


def _tokenizer_id(encoder: TextEncoder) -> str:
    """What identifies ``encoder``'s ids, for the token cache: its serialisation where it has one,
    else its name, vocabulary size and the ids of a probe text."""
    tok = encoder.tokenizer
    for obj in (tok, getattr(tok, "backend_tokenizer", None)):
        if isinstance(obj, Tokenizer):
            return hashlib.sha256(obj.to_str().encode()).hexdigest()
    probe = "The quick brown fox, it said: \"jumps over\" 12 lazy dogs' backs!"
    return f"{encoder.source}|{encoder.vocab_size}|{encoder(probe)}"
