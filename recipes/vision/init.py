"""Pretrained starts: a backbone checkpoint mapped onto the recipe's ResNet (``model.init``).

The thesis reuses pretrained backbones; this loads one whatever wrote it:

- a torchvision state dict (``resnet18().state_dict()``: ``conv1.weight``, ``layer1.0.…``,
  ``fc.*``), the layout timm's ResNets share;
- the original BiSSL code's files (the backbone's own state dict saved on its own, e.g.
  ``…_lower_backbone_id-….pth``), possibly written from a ``DistributedDataParallel`` wrapper;
- a timm checkpoint (a ``.pth``/``.bin`` state dict, or ``.safetensors``);
- any of these wrapped as ``{"state_dict": …}``, ``{"model": …}`` or ``{"backbone": …}``, or a
  recipe's own ``pretext.pt``.

Keys are mapped by dropping the wrappers' prefixes (``module.``, ``backbone.``, ``encoder.``,
``model.``) and the classifier (``fc.*``), which the recipe replaces by its own heads. Anything
else that does not fit is refused with the lists of missing and unexpected keys (and of shapes
that differ), never loaded partially.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["load_backbone_init", "read_backbone_state"]

_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_WRAPPERS = ("state_dict", "model", "backbone", "pretext")
_CLASSIFIER = ("fc.",)


def read_backbone_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a backbone checkpoint, with wrappers and prefixes removed (module
    docstring). Loaded safely (``weights_only=True``, or safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init: {path} does not exist (a backbone checkpoint: "
                                "torchvision, timm or the original BiSSL code's layout)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"model.init: {path} is not a readable checkpoint ({err})") from err
    for _ in range(3):  # {"model": {"state_dict": ...}} and the like
        if isinstance(state, Mapping):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, Tensor) for v in state.values()):
                state = inner
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"model.init: {path} holds no state dict of tensors")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name.startswith(_CLASSIFIER):
            continue
        out[name] = value
    return out


def load_backbone_init(backbone: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` (from :func:`read_backbone_state`) into ``backbone``, refusing any key,
    shape or dtype kind that does not fit, with the lists; ``source`` names the file."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def listed(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"missing keys: {listed(missing)}" if missing else "",
                 f"unexpected keys: {listed(unexpected)}" if unexpected else "",
                 f"shapes that differ: {listed(shapes)}" if shapes else ""]
        raise ValueError(
            f"model.init: {source} does not fit the configured backbone ("
            + "; ".join(p for p in parts if p)
            + "). Check model.backbone and model.small_stem against the checkpoint's network"
        )
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
