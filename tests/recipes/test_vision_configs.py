"""The shipped vision configs against the thesis numbers (DESIGN.md §4) and config validation."""

from dataclasses import asdict
from pathlib import Path

import pytest

from recipes.common import ConfigError, load_config
from recipes.vision.config import VisionConfig

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def _load(name, *overrides):
    return load_config(CONFIGS / name, VisionConfig, overrides)


def test_default_config_matches_thesis():
    c = _load("vision_default.yaml")
    assert (c.model.backbone, c.data.pretext, c.model.proj_dim) == ("resnet50", "imagenet", 256)
    p = c.pretext
    assert (p.temperature, p.trust_coefficient, p.momentum, p.weight_decay) == (
        0.5,
        1e-3,
        0.9,
        1e-6,
    )
    assert (p.lr, p.warmup_epochs, p.epochs, p.batch_size) == (4.8, 10, 500, 1024)
    d = c.data
    assert (d.crop, d.crop_scale_min, d.image_size, d.test_resize) == ("thesis", 0.5, 96, 109)
    assert d.blur_kernel == 23 and d.blur_sigma == [0.1, 2.0]
    assert d.mean == [0.485, 0.456, 0.406] and d.std == [0.229, 0.224, 0.224]
    f = c.finetune
    assert (f.momentum, f.batch_size, f.epochs, f.seeds) == (0.9, 256, 400, list(range(10)))
    assert f.lr_range == [1e-4, 1.0] and f.wd_range == [1e-5, 1e-2] and f.search_trials == 50
    assert f.search == "random" and f.search_after_bissl  # BiSSL+FT: the same procedure
    assert c.warmup.epochs == 20 and (c.warmup.lr, c.warmup.weight_decay) == (0.03, 1e-3)  # pets
    b = c.bissl
    assert (b.lam, b.lam_schedule, b.damping, b.cg_iters) == (1e-3, "constant", 10.0, 5)
    # The IJ default is a real solve whether I + H/μ is definite or not (the measurement is in the
    # config's comment and benchmarks/results/paper_scale_ij-cpu.md).
    assert (b.ij, b.curvature, b.on_breakdown) == ("minres", "hessian", "warn")
    assert (b.lower_steps, b.upper_steps, b.alternations) == (20, 8, 500)
    assert b.lower_warmup_alternations == 10 and b.grad_clip == 10.0
    assert (b.lower_lr, b.lower_weight_decay, b.final_lr_factor) == (1.0, 1e-6, 1e-3)
    assert (b.lower_batch_size, b.upper_batch_size) == (1024, 256)


def test_small_config_differs_only_in_backbone_and_pretext_data():
    default, small = asdict(_load("vision_default.yaml")), asdict(_load("vision_small.yaml"))
    assert small["model"]["backbone"] == "resnet18" and small["data"]["pretext"] == "stl10"
    # Sec. 6.1.4: the Only-FT baseline is pretrained 600 epochs, BiSSL starts from 500
    assert (small["pretext"]["epochs"], small["pretext"]["baseline_extra_epochs"]) == (500, 100)
    small["model"]["backbone"], small["data"]["pretext"] = "resnet50", "imagenet"
    small["pretext"]["baseline_extra_epochs"] = 0
    small["run"]["out_dir"] = default["run"]["out_dir"]
    assert small == default


@pytest.mark.parametrize("name", ["vision_default.yaml", "vision_small.yaml"])
def test_paper_configs_keep_plain_cg_and_the_thesis_preset_one_set_away(name):
    from implicitbilevel import CG, MINRES, OriginalBiSSLCG
    from recipes.common.ij import build_solver

    assert type(build_solver(_load(name).bissl)) is MINRES
    plain = _load(name, "bissl.ij=cg", "bissl.curvature=hessian").bissl
    assert type(build_solver(plain)) is CG and plain.curvature == "hessian"
    assert type(build_solver(_load(name, "bissl.ij=reference").bissl)) is OriginalBiSSLCG


def test_sweep_grids_are_table_6_2_and_f6_to_f8():
    s = VisionConfig().sweep
    assert s.lam == [1, 0.1, 0.01, 0.001, 0.0001]
    assert s.alternations == [100, 200, 300, 400, 500, 600, 800, 1000]
    assert s.upper_steps == [1, 2, 4, 8, 10, 12]
    assert s.lower_steps == [1, 2, 5, 10, 20, 30, 40, 50]
    assert s.finetune_epochs == [5, 10, 25, 50, 100, 200, 300, 400]
    assert s.cosine_lam_max == [10, 1, 0.1, 0.01, 0.002, 0.001, 0.0001]  # Table F.6
    assert s.exp_lam_max == [0.1, 0.01, 0.001, 0.0001] and s.exp_alpha == [1, 10, 100]  # F.7
    assert s.lam_init == [2, 1, 0.1, 0.01, 0.001, 0.0001, 0.00001]  # Table F.8


def test_embedded_config_is_self_contained():
    c = _load("vision_embedded.yaml")
    assert c.data.pretext == c.data.downstream == "digits" and c.run.device == "cpu"
    assert len(c.finetune.seeds) >= 3


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("bissl.lam_schedule=linear", "bissl.lam_schedule"),
        ("bissl.lam=0", "bissl.lam: 0.0 is out of range"),
        ("bissl.cg_iters=0", "bissl.cg_iters"),
        ("bissl.ij=cgg", "bissl.ij"),
        ("data.blur_kernel=4", "data.blur_kernel"),
        ("data.downstream=pets", "'digits' must be used for both"),
        ("finetune.lr_range=[1, 0.1]", "finetune.lr_range"),
        ("model.depth=3", "unknown key 'model.depth'"),
        ("bissl.lam_max=1e-9", "bissl.lam_max"),
    ],
)
def test_vision_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        _load("vision_embedded.yaml", override)
