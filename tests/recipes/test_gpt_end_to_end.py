"""A tiny end-to-end run of the GPT-GLUE recipe (embedded data, every stage, seconds), its BiSSL
variants, a resumed BiSSL stage and a fine-tuning-epochs sweep."""

import json
import math
import shutil

import pytest
import torch
from tiny import GPT_TINY as TINY
from tiny import SCRIPT, load_gpt_script, sets  # noqa: F401

from recipes.common import load_checkpoint
from recipes.common.pipeline import Recipe

# Slow: whole pipelines (the README says how to skip them locally).
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")]

@pytest.fixture(scope="module")
def script():
    return load_gpt_script()


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    args = sets(*TINY, f"run.out_dir={out}")
    return out, args, script.main(args)


def test_tiny_run_writes_table_results_and_plots(tiny_run, capsys):
    out, _, results = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == results["table"] and saved["recipe"] == "gpt-glue"
    assert "Only-FT" in saved["table"] and "BiSSL+FT" in saved["table"]
    assert "stsb" in saved["table"].splitlines()[0]
    for task, metric in (("sst2", "accuracy"), ("stsb", "pearson")):
        entry = saved["targets"][task]
        assert entry["metric"] == metric
        for pipeline in ("only_ft", "bissl_ft"):
            runs = entry[pipeline]["runs"]
            assert len(runs) == 2 and all(math.isfinite(r[f"test_{metric}"]) for r in runs)
            summary = entry[pipeline]["summary"][f"test_{metric}"]
            assert summary["n"] == 2 and summary["std"] >= 0
        assert len(entry["bissl_history"]) == 3
        assert (out / "plots" / f"{task}.png").stat().st_size > 0
        assert (out / task / "bissl" / "metrics.jsonl").read_text().count("\n") == 3
    accuracy = saved["summary"]["Only-FT"]["sst2"]["mean"]
    assert 0.0 <= accuracy <= 1.0
    assert len(saved["pretext_losses"]) == 5
    from tokenizers import Tokenizer  # the run's tokenizer is saved and reproduces its ids

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    assert 0 < size <= 200  # model.bpe_vocab above
    ids = tokenizer.encode("the film was great").ids
    assert ids and max(ids) < size


def test_bissl_ft_repeats_the_full_search(tiny_run):
    out, _, _ = tiny_run
    saved = json.loads((out / "results.json").read_text())
    for task in ("sst2", "stsb"):
        for pipeline in ("only_ft", "bissl_ft"):
            result = saved["targets"][task][pipeline]
            assert result["trials"] == 2 and len(result["search"]) == 2  # the 2 x 1 grid
            assert {(t["lr"], t["weight_decay"]) for t in result["search"]} == {
                (1e-3, 0.01), (3e-3, 0.01)}


def test_resume_after_a_kill_gives_the_uninterrupted_result(script, tiny_run, tmp_path,
                                                            kill_bissl_at):
    out, args, _ = tiny_run
    for name in ("pretext.pt", "tokenizer.json", "stsb/warmup.pt", "stsb/only_ft.json",
                 *(f"{n}.config.json" for n in ("pretext.pt", "stsb/warmup.pt",
                                                 "stsb/only_ft.json"))):  # with their records
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(out / name, tmp_path / name)
    args = [*args, *sets(f"run.out_dir={tmp_path}", "data.tasks=[stsb]")]
    revive = kill_bissl_at("_upper_stage", 1)
    with pytest.raises(KeyboardInterrupt):
        script.main(["bissl", *args])
    revive()
    assert load_checkpoint(tmp_path / "stsb" / "bissl" / "checkpoint.pt")["alternation"] == 1
    script.main(["bissl", "--resume", *args])
    resumed = load_checkpoint(tmp_path / "stsb" / "bissl.pt")
    whole = load_checkpoint(out / "stsb" / "bissl.pt")
    for part in ("pretext", "downstream"):
        for name, tensor in whole[part].items():
            assert torch.equal(resumed[part][name], tensor), (part, name)


@pytest.mark.parametrize(
    "variant",
    [
        ["bissl.lam_schedule=learnable", "bissl.lam_damping=0", "bissl.lam=0.01"],
        ["bissl.lam_schedule=exp-increase", "bissl.lam_max=0.1", "bissl.lam_alpha=100"],
        ["bissl.ij=neumann", "bissl.neumann_alpha=0.5"],
        ["bissl.ij=minres", "bissl.solve_over=all", "bissl.head_damping=1.0"],
        ["bissl.ij=nystrom-pcg", "bissl.curvature=gauss-newton", "bissl.nystrom_rank=4"],
        ["bissl.ij=reference", "bissl.on_breakdown=warn"],
    ],
    ids=["learnable-lambda", "exp-schedule", "neumann", "concat-head", "gauss-newton-nystrom",
         "thesis-reference"],
)
def test_chapter_5_variants_run(script, tiny_run, variant):
    out, args, _ = tiny_run
    script.main(["bissl", "--overwrite", *args, *sets("data.tasks=[stsb]", *variant)])
    history = json.loads((out / "stsb" / "bissl_history.json").read_text())
    assert len(history) == 3 and all(math.isfinite(h["upper_loss"]) for h in history)
    if "bissl.lam_schedule=learnable" in variant:
        assert all("lam_grad" in h for h in history)
    if "bissl.lam_schedule=exp-increase" in variant:
        assert history[0]["lam"] == pytest.approx(1e-8) and history[-1]["lam"] == pytest.approx(0.1)


def test_finetune_epochs_sweep_runs_bissl_once(script, tmp_path, monkeypatch):
    calls = []
    stage_bissl = Recipe.stage_bissl
    monkeypatch.setattr(Recipe, "stage_bissl", lambda self, target, resume=False: (
        calls.append(target), stage_bissl(self, target, resume))[1])
    args = sets(*TINY, f"run.out_dir={tmp_path}", "data.tasks=[sst2]", "finetune.seeds=[0]",
                "sweep.finetune_epochs=[0.5, 1]")
    result = script.main(["sweep", "--param", "finetune_epochs", *args])
    assert calls == ["sst2"]  # BiSSL once, for the base run; every value reuses it
    assert result["param"] == "finetune.epochs" and result["values"] == [0.5, 1.0]
    for method in ("Only-FT", "BiSSL+FT"):
        assert len(result["targets"]["sst2"][method]) == 2
    for value in ("0.5", "1.0"):
        assert (tmp_path / "sweep_finetune_epochs" / value / "sst2" / "bissl.pt").exists()
        assert (tmp_path / "sweep_finetune_epochs" / value / "sst2" / "bissl_ft.json").exists()
    assert result["table"].splitlines()[0].split()[:2] == ["FT", "epochs"]
    assert (tmp_path / "sweep_finetune_epochs.png").stat().st_size > 0
