"""A tiny end-to-end run of recipes/vision_bissl.py: every stage, the report, and BiSSL variants."""

import json

import pytest
import torch

from recipes import vision_bissl
from recipes.common import load_checkpoint

# Tiny random-ish models give indefinite Hessians; the solver reports it and the run goes on.
pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

TINY = [
    "data.image_size=8", "data.test_resize=8", "data.digits_pretext=128", "data.digits_train=40",
    "data.digits_val=30", "model.width=4", "model.proj_dim=16", "pretext.epochs=2",
    "pretext.batch_size=64", "pretext.warmup_epochs=1", "finetune.epochs=2",
    "finetune.batch_size=20", "finetune.search_trials=2", "finetune.search_epochs=1",
    "finetune.seeds=3", "warmup.epochs=1", "bissl.alternations=3", "bissl.lower_steps=2",
    "bissl.upper_steps=2", "bissl.lower_batch_size=32", "bissl.upper_batch_size=20",
    "bissl.lower_warmup_alternations=1", "run.threads=1", "run.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    threads = torch.get_num_threads()
    args = ["all", *[a for o in TINY for a in ("--set", o)], "--set", f"run.out_dir={out}"]
    try:
        vision_bissl.main(args)
    finally:
        torch.set_num_threads(threads)
    return out, args


def test_all_stages_write_results_and_plots(tiny_run):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    for method in ("only_ft", "bissl_ft"):
        runs = results[method]["runs"]
        assert len(runs) == 3 and all(0.0 <= r["test_top1"] <= 1.0 for r in runs)
        s = results[method]["summary"]["test_top1"]
        assert s["mean"] == pytest.approx(sum(r["test_top1"] for r in runs) / 3)
    assert "Only-FT" in results["table"] and "BiSSL+FT" in results["table"]
    history = results["bissl_history"]
    assert [h["alternation"] for h in history] == [0, 1, 2]
    assert all(h["lam"] == pytest.approx(1e-3) for h in history)
    for png in ("accuracy.png", "bissl_curves.png", "pretext_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # BiSSL moved the lower backbone θ_P away from the pretrained one
    before = load_checkpoint(out / "pretext.pt")["pretext"]
    after = load_checkpoint(out / "bissl.pt")["pretext"]
    moved = [
        k for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])
    ]
    assert moved


@pytest.mark.parametrize(
    "variant",
    [
        ["bissl.lam_schedule=learnable", "bissl.damping=0"],
        ["bissl.ij=neumann", "bissl.neumann_alpha=0.5"],
        ["bissl.ij=minres", "bissl.solve_over=all", "bissl.head_damping=1.0"],
        ["bissl.ij=nystrom-pcg", "bissl.curvature=gauss-newton", "bissl.nystrom_rank=4"],
        ["bissl.lam_schedule=cosine-increase", "bissl.lam_max=0.01", "bissl.ij=cg-blockwise"],
    ],
    ids=["learnable-lambda", "neumann", "concat-head", "gauss-newton-nystrom", "cosine-schedule"],
)
def test_bissl_variants_run(tiny_run, variant):
    out, args = tiny_run
    threads = torch.get_num_threads()
    try:
        vision_bissl.main(["bissl", *args[1:], *[a for o in variant for a in ("--set", o)]])
    finally:
        torch.set_num_threads(threads)
    history = json.loads((out / "bissl_history.json").read_text())
    assert len(history) == 3
    lams = [h["lam"] for h in history]
    if "bissl.lam_schedule=cosine-increase" in variant:
        assert lams[0] == pytest.approx(1e-8) and lams[-1] == pytest.approx(0.01)
    if "bissl.lam_schedule=learnable" in variant:
        assert all("lam_grad" in h for h in history)


def test_sweep_writes_one_table(tiny_run):
    out, args = tiny_run
    threads = torch.get_num_threads()
    try:
        vision_bissl.main(
            [
                "sweep",
                "--param",
                "upper_steps",
                *args[1:],
                "--set",
                "sweep.upper_steps=[1, 2]",
                "--set",
                "finetune.seeds=1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out / "sweep_upper_steps.json").read_text())
    assert result["param"] == "bissl.upper_steps"
    assert list(result["summary"]) == [
        "Only-FT",
        "BiSSL+FT bissl.upper_steps=1",
        "BiSSL+FT bissl.upper_steps=2",
    ]
    rows = result["table"].splitlines()
    assert len(rows) == 5 and "BiSSL+FT bissl.upper_steps=2" in rows[-1]
