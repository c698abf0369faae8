"""Pretrained starts (``model.init``): a backbone checkpoint in the layouts users have, mapped onto
the recipe's ResNet; a checkpoint of another network refused with the key lists; a vision run
that starts from it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY, run, sets
from torchvision.models import resnet18, resnet50

from recipes.common import load_checkpoint
from recipes.vision.init import load_backbone_init, read_backbone_state
from recipes.vision.models import build_backbone


def _same(module, state):
    own = module.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own)


def _written(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_a_torchvision_state_dict(tmp_path):
    source = resnet18(weights=None)
    path = _written(tmp_path, "torchvision.pth", source.state_dict())  # with its fc
    target = build_backbone("resnet18")
    load_backbone_init(target, read_backbone_state(path), str(path))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert _same(target, expected)


@pytest.mark.parametrize("wrap", ["plain", "ddp", "wrapped"])
def test_the_original_bissl_backbone_files(tmp_path, wrap):
    # The original code saves the backbone's own state dict (torchvision keys, no fc), at times
    # from inside a DistributedDataParallel wrapper or inside a larger checkpoint.
    source = build_backbone("resnet18")
    state = source.state_dict()
    if wrap == "ddp":
        state = {f"module.backbone.{k}": v for k, v in state.items()}
    if wrap == "wrapped":
        state = {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 500}
    path = _written(tmp_path, "p_lower_backbone_id-x.pth", state)
    target = build_backbone("resnet18")
    load_backbone_init(target, read_backbone_state(path), str(path))
    assert _same(target, source.state_dict())


def test_a_timm_style_safetensors_file(tmp_path):
    # timm's ResNets use torchvision's parameter names and classifier "fc"; hub files are
    # safetensors.
    source = resnet18(weights=None)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = build_backbone("resnet18")
    load_backbone_init(target, read_backbone_state(path), str(path))
    assert _same(target, {k: v for k, v in source.state_dict().items() if k != "fc.weight"})


def test_a_checkpoint_of_another_network_is_refused_with_the_lists(tmp_path):
    path = _written(tmp_path, "r50.pth", resnet50(weights=None).state_dict())
    with pytest.raises(ValueError) as err:
        load_backbone_init(build_backbone("resnet18"), read_backbone_state(path), str(path))
    message = str(err.value)
    assert "r50.pth does not fit" in message and "unexpected keys: layer1.0.bn3.bias" in message
    assert "shapes that differ: " in message and "model.backbone" in message
    small = _written(tmp_path, "stem.pth", build_backbone("resnet18").state_dict())
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(64, 3, 7, 7\), model "
                                         r"\(64, 3, 3, 3\)"):
        load_backbone_init(build_backbone("resnet18", small_stem=True),
                           read_backbone_state(small), str(small))
    with pytest.raises(FileNotFoundError, match="model.init: .*missing.pth does not exist"):
        read_backbone_state(tmp_path / "missing.pth")


def test_a_vision_run_starts_from_the_checkpoint(tmp_path):
    source = build_backbone("small-resnet", width=4)
    path = _written(tmp_path, "init.pth", source.state_dict())
    out = tmp_path / "run"
    run("pretext", *sets(*TINY, f"run.out_dir={out}", f"model.init={path}", "pretext.epochs=0",
                         "pretext.baseline_extra_epochs=0"))
    saved = load_checkpoint(out / "pretext.pt")
    assert saved["pretext"] is None and saved["losses"] == []  # the weights are used as they are
    bad = _written(tmp_path, "bad.pth", build_backbone("resnet18").state_dict())
    with pytest.raises(ValueError, match="bad.pth does not fit"):
        run("pretext", "--overwrite", *sets(*TINY, f"run.out_dir={tmp_path / 'bad'}",
                                            f"model.init={bad}"))
