"""GPT models for the pretext and downstream sides of BiSSL (thesis Sec. 5.4).

Both sides hold an ``OpenAIGPTLMHeadModel`` under the attribute ``gpt`` with the pretrained
vocabulary of ``V`` rows (input and output embedding tied), so their backbone parameters have the
same names (``gpt.*``) and shapes; the library couples parameters by name.

The downstream model adds the ``V_D`` rows of the start/delimiter/end tokens as a *separate*
parameter ``new_token_embeddings`` and builds its embedding matrix as the concatenation
``[W_e; W_new]`` (thesis Sec. 5.4.1). The new rows therefore belong to the downstream head φ_D: the
lower level never sees them, the proximal coupling and the Hessian-vector products cover only the
pretrained rows, and substituting θ_P into the downstream model replaces only those rows. The
pretext model has no head parameters (φ_P is empty, Sec. 5.4).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

BACKBONE_PREFIX = "gpt."


def build_gpt(
    *,
    pretrained: str | Path | None = None,
    vocab_size: int = 40478,
    context: int = 512,
    width: int = 768,
    layers: int = 12,
    heads: int = 12,
    dropout: float = 0.1,
) -> OpenAIGPTLMHeadModel:
    """Return an ``OpenAIGPTLMHeadModel``: loaded from ``pretrained`` (a local directory or an
    already-resolved hub id) or, when ``pretrained`` is ``None``, freshly initialised from a config.

    Dropout (embedding, attention, residual) is set to ``dropout`` in both cases.
    """
    drop = {"embd_pdrop": dropout, "attn_pdrop": dropout, "resid_pdrop": dropout}
    if pretrained is not None:
        model = OpenAIGPTLMHeadModel.from_pretrained(str(pretrained), **drop)
    else:
        config = OpenAIGPTConfig(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            **drop,
        )
        model = OpenAIGPTLMHeadModel(config)
    if model.lm_head.weight is not model.transformer.tokens_embed.weight:
        raise ValueError("the GPT's output layer must be tied to its token embedding")
    return model


def positions(input_ids: Tensor) -> Tensor:
    """Position ids ``0..L-1`` for ids (B, L), passed explicitly to the GPT.

    The forward pass then does not read the GPT's integer ``position_ids`` buffer, so it stays
    correct under any buffer handling of :func:`implicitbilevel.functional_module` inside HVPs.
    """
    return torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)


class GPTPretextModel(nn.Module):
    """The lower-level model: the GPT with its tied LM output layer; φ_P is empty."""

    def __init__(self, gpt: OpenAIGPTLMHeadModel) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: Tensor) -> Tensor:
        """Return next-token logits (B, L, V) for token ids (B, L)."""
        return self.gpt(input_ids=input_ids, position_ids=positions(input_ids)).logits


class GPTDownstreamModel(nn.Module):
    """The upper-level model: backbone ``gpt.*``, head φ_D = (``new_token_embeddings``, ``head``).

    Args:
        gpt: the backbone (its ``V`` pretrained embedding rows stay inside it).
        num_new_tokens: ``V_D``, the number of special tokens (rows appended after ``V``).
        num_outputs: classes, or 1 for regression.
        dropout: dropout before the task head (thesis Sec. 7.1.2: 0.1).
    """

    def __init__(
        self, gpt: OpenAIGPTLMHeadModel, num_new_tokens: int, num_outputs: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.gpt = gpt
        width = gpt.config.n_embd
        std = gpt.config.initializer_range
        self.new_token_embeddings = nn.Parameter(torch.randn(num_new_tokens, width) * std)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_outputs)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    @property
    def base_vocab(self) -> int:
        """``V``: rows of the pretrained embedding."""
        return int(self.gpt.transformer.tokens_embed.weight.shape[0])

    def embedding_matrix(self) -> Tensor:
        """``W_e^D = [W_e; W_new]`` of shape (V + V_D, d)."""
        return torch.cat([self.gpt.transformer.tokens_embed.weight, self.new_token_embeddings])

    def forward(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Run formatted inputs.

        Args:
            input_ids: (B, views, L) right-padded ids; views = 2 for similarity tasks.
            lengths: (B, views) number of real tokens; the last one is the end token ``e``.

        Returns:
            ``(task_output, lm_logits)``: (B, num_outputs) from the summed final hidden states of
            the end tokens of all views, and (B, views, L, V + V_D) language-model logits.
        """
        batch, views, length = input_ids.shape
        weight = self.embedding_matrix()
        flat = input_ids.reshape(batch * views, length)
        hidden = self.gpt.transformer(
            inputs_embeds=F.embedding(flat, weight), position_ids=positions(flat)
        ).last_hidden_state
        lm_logits = F.linear(hidden, weight).reshape(batch, views, length, -1)
        rows = torch.arange(batch * views, device=input_ids.device)
        last = hidden[rows, lengths.reshape(-1) - 1].reshape(batch, views, -1).sum(dim=1)
        return self.head(self.dropout(last)), lm_logits


def backbone_names(model: nn.Module) -> list[str]:
    """Names of the backbone parameters θ (the ``gpt.*`` ones, pretrained rows only)."""
    return [n for n, _ in model.named_parameters() if n.startswith(BACKBONE_PREFIX)]


def head_names(model: nn.Module) -> list[str]:
    """Names of the downstream head parameters φ_D (new-token rows and task head)."""
    return [n for n, _ in model.named_parameters() if not n.startswith(BACKBONE_PREFIX)]


def load_backbone(target: nn.Module, source: nn.Module) -> None:
    """Copy every ``gpt.*`` parameter of ``source`` into ``target`` in place (θ ← θ_source)."""
    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name.startswith(BACKBONE_PREFIX):
                if src[name].shape != p.shape:
                    raise ValueError(f"{name}: shape {tuple(src[name].shape)} != {tuple(p.shape)}")
                p.copy_(src[name])
