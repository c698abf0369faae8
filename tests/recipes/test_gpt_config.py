"""The shipped configs load and the paper config holds the numbers of DESIGN.md section 4 (NLP)."""

from pathlib import Path

import pytest

from recipes.common import ConfigError, load_config
from recipes.nlp.config import RecipeConfig

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"

# DESIGN.md section 4, NLP paragraph (thesis Sec. 7.1), written out here on purpose: the test
# fails if someone edits the paper config.
DESIGN_NLP = {
    "model.pretrained": "openai-community/openai-gpt",
    "model.context": 512,
    "model.dropout": 0.1,
    "data.tasks": ["cola", "sst2", "rte", "qnli", "mrpc", "qqp", "stsb"],
    "data.train_fraction": 0.8,
    "finetune.lrs": [1e-6, 1.93e-6, 3.72e-6, 7.2e-6, 1.39e-5, 2.68e-5, 5.18e-5, 1e-4],
    "finetune.weight_decays": [1e-5, 1e-4, 1e-3, 1e-2],
    "finetune.warmup_fraction": 0.002,
    "finetune.evals_per_epoch": 10,
    "finetune.nu": 0.5,
    "finetune.head_dropout": 0.1,
    "finetune.seeds": list(range(10)),
    "bissl.lam": 0.1,
    "bissl.alternations": 200,
    "bissl.lower_steps": 20,
    "bissl.upper_steps": 4,
    "bissl.lower_lr": 5e-6,
    "bissl.lower_batch_size": 64,
    "bissl.damping": 10.0,
    "bissl.cg_iters": 5,
    "bissl.grad_clip": 10.0,
}


def _get(cfg, dotted):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_paper_config_matches_design():
    cfg = load_config(CONFIGS / "gpt_glue_paper.yaml", RecipeConfig)
    for key, expected in DESIGN_NLP.items():
        assert _get(cfg, key) == pytest.approx(expected) if isinstance(expected, float) else \
            _get(cfg, key) == expected, key
    assert len(cfg.finetune.lrs) * len(cfg.finetune.weight_decays) == 32  # the 8 x 4 grid
    assert cfg.pretrain.steps == 0  # pretrained weights are reused
    assert cfg.finetune.search == "grid" and cfg.finetune.search_after_bissl  # Sec. 7.2
    assert cfg.bissl.upper_batch_size == cfg.finetune.batch_size == 32
    # The IJ default is a real solve whether I + H/μ is definite or not (the measurement is in the
    # config's comment and benchmarks/results/paper_scale_ij-cpu.md).
    assert (cfg.bissl.ij, cfg.bissl.curvature, cfg.bissl.on_breakdown) == (
        "minres", "hessian", "warn")


def test_paper_config_keeps_plain_cg_and_the_thesis_preset_one_set_away():
    from implicitbilevel import CG, MINRES, OriginalBiSSLCG
    from recipes.common.ij import build_solver

    path = CONFIGS / "gpt_glue_paper.yaml"
    assert type(build_solver(load_config(path, RecipeConfig).bissl)) is MINRES
    plain = load_config(path, RecipeConfig, ["bissl.ij=cg", "bissl.curvature=hessian"]).bissl
    assert type(build_solver(plain)) is CG and plain.curvature == "hessian"
    reference = load_config(path, RecipeConfig, ["bissl.ij=reference"]).bissl
    assert type(build_solver(reference)) is OriginalBiSSLCG


def test_defaults_are_the_paper_values():
    cfg = RecipeConfig()
    for key, expected in DESIGN_NLP.items():
        if key != "model.pretrained":
            assert _get(cfg, key) == expected, key


def test_embedded_config_loads_and_needs_nothing_downloaded():
    cfg = load_config(CONFIGS / "gpt_glue_embedded.yaml", RecipeConfig)
    assert cfg.model.pretrained is None and cfg.model.tokenizer is None
    assert cfg.data.glue == "embedded" and cfg.data.corpus == "embedded"


def test_bad_values_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match="bissl.lam"):
        load_config(None, RecipeConfig, ["bissl.lam=-1"])
    with pytest.raises(ConfigError, match="finetune.epoch"):
        load_config(None, RecipeConfig, ["finetune.epoch=3"])
    # An empty model reference is refused (null builds the GPT from its sizes), not read as '.'.
    with pytest.raises(ConfigError, match="model.pretrained: .*at least 1 character"):
        load_config(None, RecipeConfig, ["model.pretrained=''"])
