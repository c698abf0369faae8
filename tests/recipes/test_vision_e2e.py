"""A tiny end-to-end run of recipes/vision_bissl.py: every stage, the report, BiSSL variants,
a sweep and a resumed BiSSL stage."""

import json
import shutil

import pytest
import torch
from tiny import TINY, run, sets  # noqa: F401  (re-exported for older imports)

from recipes.common import load_checkpoint
from recipes.common.pipeline import Recipe

# Tiny random-ish models give indefinite Hessians; the solver reports it and the run goes on.
# Slow: whole pipelines (the README says how to skip them locally).
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")]

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    args = sets(*TINY, f"run.out_dir={out}")
    results = run("all", *args)
    return out, args, results


def test_all_stages_write_results_and_plots(tiny_run):
    out, _, returned = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "vision" and results["table"] == returned["table"]
    entry = results["targets"]["digits"]
    assert entry["metric"] == "top1"
    for method in ("only_ft", "bissl_ft"):
        m = entry[method]
        runs = m["runs"]
        assert len(runs) == 3 and all(0.0 <= r["test_top1"] <= 1.0 for r in runs)
        assert [r["seed"] for r in runs] == [0, 1, 2]
        s = m["summary"]["test_top1"]
        assert s["mean"] == pytest.approx(sum(r["test_top1"] for r in runs) / 3)
        assert m["trials"] == 2 and len(m["search"]) == 2  # BiSSL+FT searched again
        assert (m["lr"], m["weight_decay"]) == (m["search"][0]["lr"],
                                                m["search"][0]["weight_decay"])
    assert "Only-FT" in results["table"] and "BiSSL+FT" in results["table"]
    assert "avg diff" in results["table"]
    assert results["summary"]["BiSSL+FT"]["digits top1"] == entry["bissl_ft"]["summary"][
        "test_top1"]
    history = entry["bissl_history"]
    assert [h["alternation"] for h in history] == [0, 1, 2]
    assert all(h["lam"] == pytest.approx(1e-3) for h in history)
    for png in ("digits.png", "digits_bissl.png", "pretext_loss.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # BiSSL moved the lower backbone θ_P away from the pretrained one
    before = load_checkpoint(out / "pretext.pt")["pretext"]
    after = load_checkpoint(out / "digits" / "bissl.pt")["pretext"]
    moved = [
        k for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])
    ]
    assert moved


def test_resume_after_a_kill_gives_the_uninterrupted_result(tiny_run, tmp_path, kill_bissl_at):
    out, args, _ = tiny_run
    for name in ("pretext.pt", "digits/warmup.pt", "pretext.pt.config.json",
                 "digits/warmup.pt.config.json"):  # the files and their run records
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(out / name, tmp_path / name)
    args = [*args, *sets(f"run.out_dir={tmp_path}")]
    revive = kill_bissl_at("_lower_stage", 2)
    with pytest.raises(KeyboardInterrupt):
        run("bissl", *args)
    revive()
    assert load_checkpoint(tmp_path / "digits" / "bissl" / "checkpoint.pt")["alternation"] == 2
    run("bissl", "--resume", *args)
    resumed = load_checkpoint(tmp_path / "digits" / "bissl.pt")
    whole = load_checkpoint(out / "digits" / "bissl.pt")
    for part in ("pretext", "downstream"):
        for name, tensor in whole[part].items():
            assert torch.equal(resumed[part][name], tensor), (part, name)
    history = json.loads((tmp_path / "digits" / "bissl_history.json").read_text())
    assert [h["alternation"] for h in history] == [0, 1, 2]


@pytest.mark.parametrize(
    "variant",
    [
        ["bissl.lam_schedule=learnable", "bissl.damping=0", "bissl.lam_damping=10"],
        ["bissl.ij=neumann", "bissl.neumann_alpha=0.5"],
        ["bissl.ij=minres", "bissl.solve_over=all", "bissl.head_damping=1.0"],
        ["bissl.ij=nystrom-pcg", "bissl.curvature=gauss-newton", "bissl.nystrom_rank=4"],
        ["bissl.lam_schedule=cosine-increase", "bissl.lam_max=0.01", "bissl.ij=cg-blockwise"],
        ["bissl.ij=reference", "bissl.on_breakdown=warn"],
    ],
    ids=["learnable-lambda", "neumann", "concat-head", "gauss-newton-nystrom", "cosine-schedule",
         "thesis-reference"],
)
def test_bissl_variants_run(tiny_run, variant):
    out, args, _ = tiny_run
    run("bissl", "--overwrite", *args, *sets(*variant))
    history = json.loads((out / "digits" / "bissl_history.json").read_text())
    assert len(history) == 3
    lams = [h["lam"] for h in history]
    if "bissl.lam_schedule=cosine-increase" in variant:
        assert lams[0] == pytest.approx(1e-8) and lams[-1] == pytest.approx(0.01)
    if "bissl.lam_schedule=learnable" in variant:
        assert all("lam_grad" in h for h in history)


def test_lambda_sweep_reuses_the_stages_before_bissl(tiny_run, monkeypatch):
    out, args, _ = tiny_run
    calls = {"only-ft": 0, "bissl": 0}
    only_ft, bissl = Recipe.stage_only_ft, Recipe.stage_bissl
    monkeypatch.setattr(Recipe, "stage_only_ft", lambda self, t: (
        calls.__setitem__("only-ft", calls["only-ft"] + 1), only_ft(self, t))[1])
    monkeypatch.setattr(Recipe, "stage_bissl", lambda self, t, resume=False: (
        calls.__setitem__("bissl", calls["bissl"] + 1), bissl(self, t, resume))[1])
    result = run("sweep", "--param", "upper_steps", *args,
                 *sets("sweep.upper_steps=[1, 2]", "finetune.seeds=[0]"))
    assert calls == {"only-ft": 0, "bissl": 2}  # pretext, Only-FT and warm-up reused
    saved = json.loads((out / "sweep_upper_steps.json").read_text())
    assert saved["param"] == "bissl.upper_steps" and saved["values"] == [1, 2]
    assert saved == json.loads(json.dumps(result))
    rows = saved["table"].splitlines()
    assert rows[0].split()[0] == "N_U" and rows[1].startswith("BiSSL+FT")
    assert rows[2].startswith("Only-FT") and len(rows) == 3
    only = saved["targets"]["digits"]["Only-FT"]
    assert only[0] == only[1]  # one Only-FT for every value
    assert (out / "sweep_upper_steps.png").read_bytes()[:4] == b"\x89PNG"
