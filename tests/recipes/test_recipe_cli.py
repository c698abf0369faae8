"""Both recipes take the same command line and share one stage layer."""

import pytest

from recipes import gpt_glue_bissl, vision_bissl
from recipes.common.cli import parse_args
from recipes.common.pipeline import Recipe

RECIPES = {"vision": vision_bissl, "gpt": gpt_glue_bissl}

FORMS = [  # argv, the stages it names
    ([], ["all"]),
    (["all"], ["all"]),
    (["pretext"], ["pretext"]),
    (["only-ft", "head-warmup"], ["only-ft", "head-warmup"]),
    (["bissl", "--resume", "--set", "bissl.lam=0.01", "--set", "bissl.ij=minres"], ["bissl"]),
    (["finetune", "--config", "some.yaml"], ["finetune"]),
    (["report"], ["report"]),
    (["sweep", "--param", "finetune_epochs", "--set", "sweep.finetune_epochs=[5, 10]"],
     ["sweep"]),
    (["sweep", "--param", "lam_init", "--set", "bissl.lam_damping=10"], ["sweep"]),
]


@pytest.mark.parametrize(("argv", "stages"), FORMS, ids=lambda a: " ".join(a) or "(none)")
def test_the_same_forms_parse_identically(argv, stages):
    parsed = [vars(parse_args(argv, m.DEFAULT_CONFIG)) for m in RECIPES.values()]
    if "--config" not in argv:  # each recipe has its own embedded default
        assert [p.pop("config") for p in parsed] == [str(m.DEFAULT_CONFIG)
                                                     for m in RECIPES.values()]
    vision, gpt = parsed
    assert vision == gpt and vision["stages"] == stages
    assert vision["resume"] == ("--resume" in argv)
    assert vision["overrides"] == [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


@pytest.mark.parametrize("argv", [["nope"], ["all", "bissl"], ["sweep", "--param", "nope"],
                                  ["bissl", "overrides.without=--set"]])
def test_bad_forms_fail_in_both(argv, capsys):
    for module in RECIPES.values():
        with pytest.raises(SystemExit):
            parse_args(argv, module.DEFAULT_CONFIG)


def test_both_recipes_are_recipes_of_the_one_stage_layer():
    assert issubclass(vision_bissl.VisionRecipe, Recipe)
    assert issubclass(gpt_glue_bissl.GPTRecipe, Recipe)
    stages = [n for n in vars(Recipe) if n.startswith("stage_")]
    for recipe in (vision_bissl.VisionRecipe, gpt_glue_bissl.GPTRecipe):
        assert not [n for n in vars(recipe) if n.startswith("stage_")]  # no stage of its own
    assert sorted(stages) == ["stage_bissl", "stage_finetune", "stage_head_warmup",
                              "stage_only_ft", "stage_pretext"]
