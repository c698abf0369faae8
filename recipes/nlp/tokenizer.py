"""Tokenizers: a GPT-style ``</w>`` BPE trained locally, or a pretrained one from disk/hub.

Both are returned as a :class:`TextEncoder`, a ``text -> ids`` callable with the vocabulary size;
the special tokens are not part of it (see :class:`.tasks.SpecialTokens`).

With real OpenAI-GPT weights the tokenizer is the thesis's (Sec. 7.1.1, "Tokenization"): the
``OpenAIGPTTokenizer`` class of ``transformers`` with the pretrained vocabulary of the same
directory (``V = 40,478``), whatever ``AutoTokenizer`` would have picked. The embedded run keeps its
locally trained BPE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .hub import check_vocab, is_openai_gpt, resolve_pretrained


@dataclass(frozen=True)
class TextEncoder:
    """Maps text to token ids of a vocabulary of ``vocab_size`` (special tokens excluded)."""

    encode: Callable[[str], list[int]]
    vocab_size: int
    source: str
    tokenizer: Any = None
    batch_encode: Callable[[list[str]], list[list[int]]] | None = None

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, as :meth:`__call__` gives them (in one batched call when the
        tokenizer has one; used to tokenise a pretext corpus quickly)."""
        if self.batch_encode is None:
            return [self.encode(t) for t in texts]
        return self.batch_encode(texts)

    def save(self, directory: str | Path) -> Path | None:
        """Write the tokenizer into ``directory`` so later runs reuse the same ids: a trained
        BPE as ``tokenizer.json`` (load it with ``tokenizers.Tokenizer.from_file``), a pretrained
        one with ``save_pretrained``. Returns the path written (``None`` if nothing to save)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.tokenizer, Tokenizer):
            path = directory / "tokenizer.json"
            self.tokenizer.save(str(path))
            return path
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))
            return directory / "tokenizer"
        return None


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextEncoder:
    """Train a lower-casing byte-pair encoding with GPT's ``</w>`` end-of-word suffix.

    Takes about 0.1 s on half a megabyte of text. The vocabulary may end up smaller than
    ``vocab_size`` when the text has fewer merges to offer. The token ids are renumbered
    canonically (see :func:`_canonical_ids`), so the same text gives the same ids in every process.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _bpe_encoder(_canonical_ids(tokenizer))


def _canonical_ids(tokenizer: Tokenizer) -> Tokenizer:
    """Renumber a trained BPE: special tokens, then the initial alphabet sorted by text, then the
    merged tokens in merge order.

    The trainer numbers alphabet symbols of equal frequency in hash-map order, which differs from
    process to process; the merges themselves do not depend on it here, so renumbering makes the
    ids, and every model trained on them, reproducible.
    """
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    merged = {a + b for a, b in pairs}
    special = {t["content"] for t in state.get("added_tokens", [])}

    def key(token: str) -> tuple[int, int, str]:
        if token in special:
            return (0, vocab[token], "")
        if token in merged:
            return (2, vocab[token], "")
        return (1, 0, token)

    order = sorted(vocab, key=key)
    model["vocab"] = {token: i for i, token in enumerate(order)}
    for added in state.get("added_tokens", []):
        added["id"] = model["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(state))


def bpe_from_json(text: str) -> TextEncoder:
    """Rebuild a BPE trained by :func:`train_bpe` from ``encoder.tokenizer.to_str()``, e.g. on
    the ranks of a distributed run that received it from rank 0."""
    return _bpe_encoder(Tokenizer.from_str(text))


def _bpe_encoder(tokenizer: Tokenizer) -> TextEncoder:
    return TextEncoder(
        lambda text: tokenizer.encode(text).ids, tokenizer.get_vocab_size(), "trained BPE",
        tokenizer,
        lambda texts: [e.ids for e in tokenizer.encode_batch(texts)],
    )


def load_pretrained_tokenizer(
    reference: str, expected_vocab: int | None, *, openai_gpt: bool | None = None
) -> TextEncoder:
    """Load a tokenizer from a local directory or hub id (failing fast offline) and check that its
    vocabulary is real and matches the model's ``expected_vocab`` rows.

    Args:
        reference: a directory written by ``save_pretrained`` (model and/or tokenizer) or a hub id.
        expected_vocab: the rows of the model's token embedding (``None``: not checked).
        openai_gpt: load with ``OpenAIGPTTokenizer`` (the thesis's tokenizer, Sec. 7.1.1);
            ``None`` decides by :func:`.hub.is_openai_gpt` (an OpenAI-GPT model or tokenizer
            directory); ``False`` uses ``AutoTokenizer``.

    Raises:
        MissingResourceError: the files are missing (``OpenAIGPTTokenizer`` then silently comes
            back with a vocabulary of one token, which :func:`.hub.check_vocab` rejects) or the
            vocabulary size differs from ``expected_vocab``.
    """
    from transformers import AutoTokenizer, OpenAIGPTTokenizer

    source = resolve_pretrained(reference, "tokenizer")
    if openai_gpt is None:
        openai_gpt = is_openai_gpt(source)
    loader = OpenAIGPTTokenizer if openai_gpt else AutoTokenizer
    tokenizer = loader.from_pretrained(source)
    size = len(tokenizer)
    check_vocab(size, expected_vocab, reference)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    name = f"{reference}, {type(tokenizer).__name__}"
    return TextEncoder(encode, size, name, tokenizer, encode_batch)
