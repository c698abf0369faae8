"""Resolve a pretrained model/tokenizer reference, failing fast when the hub is out of reach.

Offline, ``OpenAIGPTTokenizer.from_pretrained(hub_id)`` retries for minutes and then silently
returns a tokenizer with a vocabulary of one token. Every hub access in the NLP recipe goes through
:func:`resolve_pretrained` first, and every loaded tokenizer is checked by :func:`check_vocab`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

HUB_HOST = "huggingface.co"


class MissingResourceError(RuntimeError):
    """A model, tokenizer or data set the run needs is not available on this machine."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """``True`` when the model hub accepts a TCP connection within ``timeout`` seconds and
    ``HF_HUB_OFFLINE`` is not set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained(reference: str, what: str) -> str:
    """Return ``reference`` if it is a local directory or a hub id that can be fetched now.

    Args:
        reference: a local directory (from ``save_pretrained``) or a hub id.
        what: what it is, for the error message (``"model"``, ``"tokenizer"``).

    Raises:
        MissingResourceError: the path is not a directory and the hub is unreachable.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise MissingResourceError(f"{what} {reference!r} is a file; pass the directory")
    if not hub_reachable():
        raise MissingResourceError(
            f"{what} {reference!r} is not a local directory and the model hub ({HUB_HOST}) is "
            "unreachable from this machine. On a connected machine run\n"
            f"    OpenAIGPTLMHeadModel.from_pretrained({reference!r}).save_pretrained(DIR)\n"
            f"    OpenAIGPTTokenizer.from_pretrained({reference!r}).save_pretrained(DIR)\n"
            "copy DIR here and pass it instead (or run with no model to use the embedded GPT)."
        )
    return reference


def check_vocab(vocab_size: int, expected: int | None, source: str, minimum: int = 16) -> None:
    """Raise if a loaded tokenizer's vocabulary is degenerate or disagrees with the model's."""
    if vocab_size < minimum:
        raise MissingResourceError(
            f"the tokenizer from {source!r} has a vocabulary of {vocab_size} token(s): its files "
            "were not found (an offline hub load returns such a tokenizer). Pass a directory "
            "written by save_pretrained."
        )
    if expected is not None and vocab_size != expected:
        raise MissingResourceError(
            f"the tokenizer from {source!r} has {vocab_size} tokens but the model's embedding has "
            f"{expected} rows; use the tokenizer the model was pretrained with"
        )


OPENAI_GPT_TOKENIZERS = ("OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast")


def is_openai_gpt(source: str) -> bool:
    """``True`` when ``source`` (a resolved directory or hub id) holds OpenAI-GPT weights
    (``config.json`` with ``model_type: openai-gpt``) or an OpenAI-GPT tokenizer
    (``tokenizer_config.json`` naming ``OpenAIGPTTokenizer``). A hub id is asked through
    ``AutoConfig``, so pass it through :func:`resolve_pretrained` first."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source).model_type == "openai-gpt"
        except (OSError, ValueError):
            return False
    for name, key, accepted in (
        ("config.json", "model_type", ("openai-gpt",)),
        ("tokenizer_config.json", "tokenizer_class", OPENAI_GPT_TOKENIZERS),
    ):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            continue
        if value in accepted:
            return True
    return False
