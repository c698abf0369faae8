"""The pretext chunk order: seeded, reshuffled per pass, sharded, resumable (Algorithm 2)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from implicitbilevel.bissl.batch_stack import BatchStack
from recipes.nlp import data as data_module
from recipes.nlp.config import DataConfig
from recipes.nlp.corpus import (
    ChunkOrderSampler,
    TokenChunks,
    cached_corpus_tokens,
    chunk_tokens,
    derive_seed,
    tokenize_corpus,
)
from recipes.nlp.data import pretext_chunks, pretext_loader
from recipes.nlp.synthetic import pretext_corpus
from recipes.nlp.tokenizer import train_bpe

CONTEXT, BATCH = 32, 4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder():
    return train_bpe(pretext_corpus(300, seed=0), 120)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A .txt corpus of 900 template sentences (693 chunks of 32 tokens)."""
    path = tmp_path_factory.mktemp("corpus") / "books.txt"
    path.write_text("\n\n".join(pretext_corpus(900, seed=0)), encoding="utf-8")
    return str(path)


def _batches(loader, n=None):
    out = [b.clone() for b in loader]
    return out if n is None else out[:n]


def _draw(stack, n):
    return [stack.next().clone() for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_chunks_are_the_in_order_chunks_and_an_epoch_is_a_permutation(encoder, corpus_file):
    data = DataConfig(corpus=corpus_file)
    chunks = pretext_chunks(data, encoder, CONTEXT)
    texts = open(corpus_file, encoding="utf-8").read().split("\n\n")
    in_order = list(chunk_tokens(texts, encoder, CONTEXT))
    assert len(chunks) == len(in_order) == 693
    assert all(torch.equal(chunks[i], c) for i, c in enumerate(in_order))
    assert chunks[0].dtype == torch.long
    sampler = ChunkOrderSampler(len(chunks), len(chunks), seed=5)
    order = list(sampler)
    assert sorted(order) == list(range(len(chunks))) and order != sorted(order)


def test_same_seed_same_order_different_seeds_differ(encoder, corpus_file):
    data = DataConfig(corpus=corpus_file)
    a = _batches(pretext_loader(data, encoder, CONTEXT, BATCH, 20, seed=3))
    b = _batches(pretext_loader(data, encoder, CONTEXT, BATCH, 20, seed=3))  # a second "run"
    c = _batches(pretext_loader(data, encoder, CONTEXT, BATCH, 20, seed=4))
    assert len(a) == 20 and a[0].shape == (BATCH, CONTEXT)
    assert _same(a, b)
    assert not _same(a, c)
    # not the corpus order any more
    in_order = torch.stack([pretext_chunks(data, encoder, CONTEXT)[i] for i in range(BATCH)])
    assert not torch.equal(a[0], in_order)
    # the order does not depend on torch's global random state
    torch.manual_seed(123)
    d = _batches(pretext_loader(data, encoder, CONTEXT, BATCH, 20, seed=3))
    assert _same(a, d)


def test_consecutive_passes_differ(encoder, corpus_file):
    loader = pretext_loader(DataConfig(corpus=corpus_file), encoder, CONTEXT, BATCH, 20, seed=0)
    first, second = _batches(loader), _batches(loader)
    assert not _same(first, second)
    # the batch stack's passes differ as well, and pass p is the same whoever draws it
    stack = BatchStack(loader)
    passes = [_draw(stack, 20) for _ in range(3)]
    assert not _same(passes[0], passes[1]) and not _same(passes[1], passes[2])
    assert _same(passes[0], first) and _same(passes[1], second)


def test_passes_take_unseen_chunks_until_the_corpus_is_used_up():
    sampler = ChunkOrderSampler(100, 30, seed=1)
    passes = [list(sampler) for _ in range(4)]  # 120 positions: epoch 0, then 20 of epoch 1
    seen = passes[0] + passes[1] + passes[2] + passes[3][:10]
    assert sorted(seen) == list(range(100))
    assert passes[3][10:] == sampler.permutation(1)[:20].tolist()


@pytest.mark.parametrize("done", [20, 45, 61])  # at a pass boundary, in pass 2, in pass 3
def test_resume_reproduces_the_remaining_batches(encoder, corpus_file, done):
    data = DataConfig(corpus=corpus_file)
    chunks = pretext_chunks(data, encoder, CONTEXT)

    def make_stack():
        return BatchStack(pretext_loader(data, encoder, CONTEXT, BATCH, 20, seed=7, chunks=chunks))

    stack = make_stack()
    stack.reserve(5)
    _draw(stack, done)
    state = stack.state_dict()
    torch.manual_seed(999)  # whatever happens to the global generator in between
    expected = []
    for _ in range(3):  # the trainer reserves before each stage
        stack.reserve(6)
        expected += _draw(stack, 6)
    expected += _draw(stack, 25)

    resumed = make_stack()  # a new process: new loader, new stack
    resumed.load_state_dict(state)
    assert resumed.passes == state["passes"] and resumed.consumed == state["consumed"]
    got = []
    for _ in range(3):
        resumed.reserve(6)
        got += _draw(resumed, 6)
    got += _draw(resumed, 25)
    assert _same(got, expected)


def test_two_ranks_are_disjoint_and_cover_the_pass(encoder, corpus_file):
    data = DataConfig(corpus=corpus_file)
    chunks = pretext_chunks(data, encoder, CONTEXT)
    n_batches = 40  # 2 ranks x 40 batches x 4 = 320 of 693 chunks

    def indices(shard, batch, epoch):
        sampler = pretext_loader(data, encoder, CONTEXT, batch, n_batches, seed=2, shard=shard,
                                 chunks=chunks).sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    for epoch in range(2):  # passes 0 and 1 both lie inside the first corpus epoch
        ranks = [indices((r, 2), BATCH, epoch) for r in range(2)]
        whole = indices(None, 2 * BATCH, epoch)  # one process, the global batch
        assert len(ranks[0]) == len(ranks[1]) == n_batches * BATCH
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(whole)
        for b in range(n_batches):  # and step by step: the ranks' b-th batches form the global one
            step = ranks[0][b * BATCH:(b + 1) * BATCH] + ranks[1][b * BATCH:(b + 1) * BATCH]
            assert sorted(step) == sorted(whole[b * 2 * BATCH:(b + 1) * 2 * BATCH])
    # the loaders give the chunks of those indices
    loader = pretext_loader(data, encoder, CONTEXT, BATCH, n_batches, seed=2, shard=(1, 2),
                            chunks=chunks)
    first = next(iter(loader))
    assert torch.equal(first, torch.stack([chunks[i] for i in indices((1, 2), BATCH, 0)[:BATCH]]))
    with pytest.raises(ValueError, match="shard"):
        ChunkOrderSampler(10, 2, shard=(2, 2))


@pytest.mark.parametrize("corpus", ["file", "embedded"])
def test_a_corpus_shorter_than_a_pass_starts_a_new_one(encoder, corpus_file, corpus):
    data = (DataConfig(corpus=corpus_file) if corpus == "file"
            else DataConfig(corpus="embedded", embedded_corpus_sentences=900))
    chunks = pretext_chunks(data, encoder, CONTEXT)
    num_batches = 10 * (20 + 1)  # T·(N_L + 1) with T = 10, N_L = 20: 840 chunks
    assert len(chunks) < num_batches * BATCH
    for shard in (None, (1, 2)):
        loader = pretext_loader(data, encoder, CONTEXT, BATCH, num_batches, seed=0, shard=shard,
                                chunks=chunks)
        assert len(loader) == num_batches
        stack = BatchStack(loader)
        for _ in range(12):  # more than one pass of the stack
            stack.reserve(21)
            for _ in range(21):
                assert stack.next().shape == (BATCH, CONTEXT)
        assert stack.passes == 2
    # one pass of a single process holds every chunk at least once
    order = list(ChunkOrderSampler(len(chunks), num_batches * BATCH, seed=0))
    assert set(order) == set(range(len(chunks)))


def test_streamed_corpus_shorter_than_a_pass_is_read_again(encoder, corpus_file):
    data = DataConfig(corpus=corpus_file)
    loader = pretext_loader(data, encoder, CONTEXT, BATCH, 210, shuffle=False)
    stack = BatchStack(loader)
    batches = _draw(stack, 211)  # a whole pass (twice the corpus and more) and one of the next
    assert len(batches) == 211
    assert torch.equal(batches[0], batches[210])  # in order, from the start again
    in_order = list(chunk_tokens(open(corpus_file).read().split("\n\n"), encoder, CONTEXT))
    assert torch.equal(batches[173][0], in_order[692]) and torch.equal(batches[173][1], in_order[0])


def test_too_small_corpus_and_epoch_length(encoder, corpus_file):
    data = DataConfig(corpus=corpus_file)
    chunks = pretext_chunks(data, encoder, CONTEXT)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretext_loader(data, encoder, CONTEXT, 700, 3, chunks=chunks)
    assert len(pretext_loader(data, encoder, CONTEXT, BATCH, None, chunks=chunks)) == 693 // 4
    with pytest.raises(ValueError, match="no chunk"):
        ChunkOrderSampler(0, 4)


def test_token_cache_is_written_once_and_reused(encoder, corpus_file, tmp_path):
    tokens = cached_corpus_tokens(corpus_file, encoder, vocab_size=encoder.vocab_size,
                                  tokenizer_id="bpe", cache_dir=tmp_path)
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".tokens"] and tokens.dtype == np.uint16

    def refuse(text):
        raise AssertionError("the cache should have been read")

    again = cached_corpus_tokens(corpus_file, refuse, vocab_size=encoder.vocab_size,
                                 tokenizer_id="bpe", cache_dir=tmp_path)
    assert isinstance(again, np.memmap) and np.array_equal(again, tokens)
    in_memory = tokenize_corpus(open(corpus_file).read().split("\n\n"), encoder,
                                vocab_size=encoder.vocab_size)
    assert np.array_equal(in_memory, tokens)
    # another tokenizer gets its own file; the loader reads through the cache too
    cached_corpus_tokens(corpus_file, encoder, vocab_size=encoder.vocab_size,
                         tokenizer_id="other", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tokens"))) == 2
    data_module._TOKENS.clear()  # no tokens kept from earlier tests in this process
    loader = pretext_loader(DataConfig(corpus=corpus_file), encoder, CONTEXT, BATCH, 5,
                            cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tokens"))) == 3  # keyed by the encoder's serialisation
    assert len(_batches(loader)) == 5


def test_one_tokenisation_serves_several_loaders(encoder, corpus_file, monkeypatch):
    data = DataConfig(corpus=corpus_file)
    first = pretext_chunks(data, encoder, CONTEXT)
    monkeypatch.setattr(data_module, "cached_corpus_tokens", None)  # would fail if called
    again = pretext_chunks(data, encoder, 2 * CONTEXT)
    assert again.tokens is first.tokens and len(again) == len(first) // 2


def test_batched_encoding_and_seed_derivation(encoder):
    texts = pretext_corpus(50, seed=3)
    assert encoder.encode_batch(texts) == [encoder(t) for t in texts]
    assert TokenChunks(np.arange(10, dtype=np.uint16), 4)[1].tolist() == [4, 5, 6, 7]
    assert derive_seed(0, "bissl", "rte") == derive_seed(0, "bissl", "rte")
    assert len({derive_seed(0, "bissl", "rte"), derive_seed(0, "bissl", "mrpc"),
                derive_seed(1, "bissl", "rte"), derive_seed(0, "pretrain")}) == 4


def test_the_order_is_the_same_in_another_process():
    code = (
        "from recipes.nlp.corpus import ChunkOrderSampler\n"
        "s = ChunkOrderSampler(1000, 64, seed=3, shard=(1, 2))\n"
        "s.set_epoch(4)\n"
        "print(list(s))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT).stdout
    here = ChunkOrderSampler(1000, 64, seed=3, shard=(1, 2))
    here.set_epoch(4)
    assert out.strip() == str(list(here))


@pytest.mark.parametrize(
    ("n", "per_rank", "world"), [(7, 3, 2), (10, 25, 3), (5, 1, 4), (3, 50, 2)]
)
def test_sampler_follows_the_stream_definition(n, per_rank, world):
    # position q of the stream is chunk permutation(q // n)[q % n]; rank r of pass p takes the
    # positions p·P + j·world + r, P = per_rank · world
    for rank in range(world):
        sampler = ChunkOrderSampler(n, per_rank, seed=2, shard=(rank, world))
        for epoch in range(4):
            sampler.set_epoch(epoch)
            positions = [epoch * per_rank * world + j * world + rank for j in range(per_rank)]
            expected = [int(sampler.permutation(q // n)[q % n]) for q in positions]
            assert list(sampler) == expected == sampler.indices(epoch).tolist()
