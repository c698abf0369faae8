"""Tokenizer selection: the thesis's OpenAIGPTTokenizer with real GPT weights (Sec. 7.1.1), the
locally trained BPE for the embedded run, and the vocabulary guard."""

import json

import pytest
import transformers
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel, OpenAIGPTTokenizer

from recipes.nlp.config import DataConfig, ModelConfig
from recipes.nlp.data import make_tokenizer
from recipes.nlp.hub import MissingResourceError, is_openai_gpt
from recipes.nlp.model import build_gpt

LETTERS = "abcdefghijklmnopqrstuvwxyz.,!?"
MERGES = ["t h", "th e</w>", "a n", "an d</w>"]


def _vocab() -> dict[str, int]:
    vocab = {"<unk>": 0}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merge in MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    return vocab


@pytest.fixture
def gpt_dir(tmp_path, monkeypatch):
    """A tiny local copy in the layout of the hub's ``openai-gpt``: config, weights, vocab.json and
    merges.txt (no tokenizer_config.json)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = _vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    config = OpenAIGPTConfig(vocab_size=len(vocab), n_positions=16, n_embd=8, n_layer=1, n_head=2)
    OpenAIGPTLMHeadModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_real_gpt_weights_get_the_openai_gpt_tokenizer(gpt_dir, monkeypatch):
    gpt = build_gpt(pretrained=str(gpt_dir))

    def no_auto(*args, **kwargs):
        raise AssertionError("AutoTokenizer must not be used for OpenAI-GPT weights")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_auto)
    encoder = make_tokenizer(ModelConfig(pretrained=str(gpt_dir)), DataConfig(),
                             expected_vocab=gpt.config.vocab_size)
    assert type(encoder.tokenizer) is OpenAIGPTTokenizer
    assert encoder.vocab_size == gpt.config.vocab_size == len(_vocab())
    vocab = _vocab()
    # lower-cased, BERT pre-tokenised, </w> BPE with the directory's merges
    assert encoder("The hand and THE.") == [
        vocab["the</w>"], vocab["h"], vocab["and</w>"], vocab["and</w>"], vocab["the</w>"],
        vocab[".</w>"],
    ]
    assert encoder.encode_batch(["the and", "hand"]) == [encoder("the and"), encoder("hand")]
    assert "OpenAIGPTTokenizer" in encoder.source
    # model.tokenizer, when given, names the tokenizer directory instead
    tok_dir = gpt_dir / "tok"
    encoder.tokenizer.save_pretrained(tok_dir)
    assert is_openai_gpt(str(tok_dir))
    other = make_tokenizer(ModelConfig(pretrained="unused", tokenizer=str(tok_dir)), DataConfig(),
                           expected_vocab=len(vocab))
    assert type(other.tokenizer) is OpenAIGPTTokenizer and other("the and") == encoder("the and")


def test_embedded_run_keeps_its_trained_bpe():
    data = DataConfig(corpus="embedded", embedded_corpus_sentences=300)
    encoder = make_tokenizer(ModelConfig(bpe_vocab=100), data, expected_vocab=None)
    assert encoder.source == "trained BPE" and encoder.vocab_size <= 100
    assert not isinstance(encoder.tokenizer, OpenAIGPTTokenizer)


def test_vocabulary_guard(gpt_dir, tmp_path):
    # OpenAI-GPT weights without the tokenizer files: OpenAIGPTTokenizer silently comes back with a
    # vocabulary of one token, which the guard rejects
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((gpt_dir / "config.json").read_text())
    assert is_openai_gpt(str(bare)) and not is_openai_gpt(str(tmp_path / "nothing"))
    with pytest.raises(MissingResourceError, match="vocabulary of 1 token"):
        make_tokenizer(ModelConfig(pretrained=str(bare)), DataConfig(), expected_vocab=None)
    # a tokenizer that does not match the model's embedding rows
    with pytest.raises(MissingResourceError, match="40478 rows"):
        make_tokenizer(ModelConfig(pretrained=str(gpt_dir)), DataConfig(), expected_vocab=40478)
    # a hub id offline fails fast instead of returning the broken tokenizer
    with pytest.raises(MissingResourceError, match="unreachable"):
        make_tokenizer(ModelConfig(pretrained="openai-community/openai-gpt"), DataConfig(),
                       expected_vocab=None)
