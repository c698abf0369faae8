"""Assemble the recipe's data: tokenizer, encoded GLUE splits and the pretext chunk loader.

``glue: embedded`` and ``corpus: embedded`` use :mod:`.synthetic` (nothing downloaded); anything
else goes through :mod:`.glue` and :mod:`.corpus`, which raise a clear error naming what is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from recipes.common import shard_loader

from .config import DataConfig, ModelConfig
from .corpus import ChunkDataset, chunk_tokens, text_source
from .glue import RawSplit, load_glue_task, train_validation_split
from .synthetic import pretext_corpus, synthetic_task
from .tasks import EncodedTask, SpecialTokens, TaskSpec, encode_split, get_task
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
    """The pretrained tokenizer when one is configured, else a BPE trained on the embedded corpus
    (``model.bpe_vocab`` tokens at most)."""
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
    """Load (embedded or real), split 80/20 in order and encode one task."""
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


def pretext_loader(
    data: DataConfig,
    encoder: TextEncoder,
    context: int,
    batch_size: int,
    num_batches: int,
    *,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
) -> DataLoader:
    """A re-iterable loader of ``batch_size`` × ``context`` token chunks of the pretext corpus.

    The embedded corpus is tokenised in memory and shuffled every pass. Other corpora are streamed
    in order and each pass stops after ``num_batches`` batches (the BiSSL trainer needs a loader
    with a length); the corpus must be long enough for that.

    With ``shard=(rank, world_size)`` each rank gets its own disjoint part of every pass and
    ``batch_size`` is the per-rank batch: the embedded chunks through a ``DistributedSampler``
    seeded with ``seed``, a streamed corpus by chunk index (:class:`.corpus.ChunkDataset`). Either
    way a pass still holds ``num_batches`` batches on every rank.
    """
    world = shard[1] if shard is not None else 1
    if data.corpus == "embedded":
        paragraphs = pretext_corpus(data.embedded_corpus_sentences, seed=1)
        chunks = list(chunk_tokens(paragraphs, encoder, context))
        if len(chunks) < batch_size * world:
            raise ValueError(
                f"the embedded corpus gives {len(chunks)} chunks of {context} tokens, "
                f"fewer than one batch of {batch_size * world}"
            )
        return shard_loader(
            TensorDataset(torch.stack(chunks)),
            batch_size,
            shuffle=True,
            seed=seed,
            shard=shard,
            drop_last=True,
            collate_fn=_stack_chunks,
        )
    dataset = ChunkDataset(
        text_source(data.corpus),
        encoder,
        context,
        max_chunks=num_batches * batch_size * world,
        shard=shard,
    )
    return DataLoader(dataset, batch_size=batch_size, drop_last=True)


def _stack_chunks(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([item[0] for item in items])
