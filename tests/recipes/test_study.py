"""The ``study`` command: paired statistics against scipy, the pairing of seeds and data order, a
tiny study end to end, resume of a killed study, and the significance lines of the report."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats as sps
from test_vision_e2e import TINY, run, sets

from recipes.common import study as study_module
from recipes.common.cli import parse_args
from recipes.common.fingerprint import ConfigChanged
from recipes.common.pipeline import Recipe
from recipes.common.report import format_comparisons
from recipes.common.stats import compare_methods, paired_comparison, paired_runs
from recipes.vision_bissl import DEFAULT_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

A = [0.712, 0.705, 0.731, 0.698, 0.720, 0.709, 0.715, 0.701]
B = [0.741, 0.729, 0.738, 0.722, 0.751, 0.725, 0.733, 0.730]


# -- statistics ----------------------------------------------------------------------------------


def test_paired_statistics_match_scipy():
    c = paired_comparison(A, B, wilcoxon=True)
    d = np.subtract(B, A)
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert c.n == 8 and c.diff == pytest.approx(d.mean(), rel=1e-12)
    assert c.ci == pytest.approx((lo, hi), rel=1e-10)
    assert c.p_value == pytest.approx(sps.ttest_rel(B, A).pvalue, rel=1e-10)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-12)
    assert c.std_ratio == pytest.approx(np.std(B, ddof=1) / np.std(A, ddof=1), rel=1e-12)
    assert (c.mean_a, c.std_a) == pytest.approx((np.mean(A), np.std(A, ddof=1)), rel=1e-12)
    assert c.p_value < 1e-3 and c.significant
    # a 99% interval is wider and contains the 95% one; the p-value does not depend on alpha
    wide = paired_comparison(A, B, alpha=0.01)
    assert wide.ci[0] < c.ci[0] and wide.ci[1] > c.ci[1] and wide.p_value == c.p_value


def test_a_noisy_difference_is_not_significant_and_the_bootstrap_is_near_the_t_interval():
    rng = np.random.default_rng(3)
    a = rng.normal(0.8, 0.02, 10)
    b = a + rng.normal(0.002, 0.02, 10)
    c = paired_comparison(a, b, bootstrap=4000, seed=1)
    assert c.p_value == pytest.approx(sps.ttest_rel(b, a).pvalue, rel=1e-10)
    assert not c.significant and c.ci[0] < 0 < c.ci[1]
    lo, hi = c.bootstrap_ci
    assert lo < c.diff < hi
    # the percentile bootstrap of a mean is a bit narrower than t at n = 10, same centre
    assert (hi - lo) / (c.ci[1] - c.ci[0]) == pytest.approx(0.9, abs=0.15)


def test_degenerate_differences_and_too_few_pairs():
    same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], wilcoxon=True, bootstrap=100)
    assert (same.p_value, same.ci, same.significant) == (1.0, (0.0, 0.0), False)
    assert same.wilcoxon_p == 1.0 and same.bootstrap_ci == (0.0, 0.0)
    assert "zero variance" in same.note and same.std_ratio == pytest.approx(1.0)
    shifted = paired_comparison([0.5, 0.6, 0.7], [0.75, 0.85, 0.95])  # constant +0.25
    assert shifted.p_value == 0.0 and shifted.significant
    assert shifted.ci == pytest.approx((0.25, 0.25)) and "zero variance" in shifted.note
    one = paired_comparison([0.5], [0.7], wilcoxon=True)
    assert math.isnan(one.p_value) and math.isnan(one.ci[0]) and not one.significant
    assert "n < 2" in one.note and math.isnan(one.wilcoxon_p)
    flat = paired_comparison([0.5, 0.5], [0.4, 0.6])
    assert flat.std_ratio == math.inf  # the baseline did not vary
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        paired_comparison([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="alpha"):
        paired_comparison(A, B, alpha=1.0)


def test_runs_pair_by_seed_or_not_at_all():
    only = [{"seed": 1, "test_top1": 0.5}, {"seed": 0, "test_top1": 0.4}]
    bissl = [{"seed": 0, "test_top1": 0.45}, {"seed": 1, "test_top1": 0.7}]
    assert paired_runs(only, bissl, "test_top1") == ([1, 0], [0.5, 0.4], [0.7, 0.45])
    with pytest.raises(ValueError, match="different seeds"):
        paired_runs(only, bissl[:1], "test_top1")
    assert compare_methods({"runs": only}, {"runs": bissl[:1]}, "test_top1") is None
    c = compare_methods({"runs": only}, {"runs": bissl}, "test_top1")
    assert c.diff == pytest.approx(0.125)
    lines = format_comparisons({"digits": c, "other": None})
    assert "digits: +12.50" in lines and "not significant" in lines
    assert "other: not run over the same seeds" in lines


def test_the_study_command_parses_and_runs_alone():
    assert parse_args(["study", "--set", "study.seeds=[0, 1]"], DEFAULT_CONFIG).stages == ["study"]
    with pytest.raises(SystemExit):
        parse_args(["study", "pretext"], DEFAULT_CONFIG)


# -- the study end to end ------------------------------------------------------------------------

STUDY = ["study.epochs=[1, 2]", "study.seeds=[0, 1]", "study.search_trials=1",
         "study.bootstrap=200"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One uninterrupted tiny study, with a record of what every fine-tuning run saw."""
    out = tmp_path_factory.mktemp("study")
    seen: list[tuple] = []
    tests: list[str] = []
    mp = pytest.MonkeyPatch()
    fine_tune, train_loader, eval_loader = Recipe.fine_tune, None, None
    from recipes.vision_bissl import VisionRecipe
    train_loader, eval_loader = VisionRecipe.train_loader, VisionRecipe.eval_loader
    current = {}

    def traced_fine_tune(self, target, source, name, *args, **kwargs):
        current["method"] = name
        current["epochs"] = kwargs["ft"].epochs if kwargs.get("ft") else None
        return fine_tune(self, target, source, name, *args, **kwargs)

    def traced_train_loader(self, target, batch_size, seed, shard=None):
        loader = train_loader(self, target, batch_size, seed, shard)
        labels = tuple(int(y) for _, y in loader for y in y)  # one epoch's order
        seen.append((current.get("method"), current.get("epochs"), seed, labels))
        return loader

    def traced_eval_loader(self, target, split):
        tests.append(current.get("method") if split == "test" else "val")
        return eval_loader(self, target, split)

    mp.setattr(Recipe, "fine_tune", traced_fine_tune)
    mp.setattr(VisionRecipe, "train_loader", traced_train_loader)
    mp.setattr(VisionRecipe, "eval_loader", traced_eval_loader)
    try:
        result = run("study", *sets(*TINY, *STUDY, f"run.out_dir={out}"))
    finally:
        mp.undo()
    return out, result, seen, tests


def test_a_tiny_study_writes_table_plot_and_every_run(tiny_study):
    out, result, _, _ = tiny_study
    written = json.loads((out / "study" / "study.json").read_text())
    assert written["epochs"] == [1.0, 2.0] and written["seeds"] == [0, 1]
    assert written["code_version"]["implicitbilevel"]
    assert "validation" in written["protocol"]["selection"]
    assert written["protocol"]["fixed"]["bissl"]["lam"] == pytest.approx(1e-3)
    rows = written["targets"]["digits"]["rows"]
    assert [r["epochs"] for r in rows] == [1.0, 2.0]
    for row in rows:
        for method in ("Only-FT", "BiSSL+FT"):
            cell = row["cells"][method]
            assert [r["seed"] for r in cell["runs"]] == [0, 1] and cell["trials"] == 1
            assert cell["epochs"] == row["epochs"]
        only = [r["test_top1"] for r in row["cells"]["Only-FT"]["runs"]]
        bissl = [r["test_top1"] for r in row["cells"]["BiSSL+FT"]["runs"]]
        ref = sps.ttest_rel(bissl, only)
        c = row["comparison"]
        assert c["diff"] == pytest.approx(np.mean(bissl) - np.mean(only))
        if np.std(np.subtract(bissl, only)) > 0:
            assert c["p_value"] == pytest.approx(ref.pvalue)
    table = written["targets"]["digits"]["table"]
    assert table.splitlines()[0] == "| FT epochs | 1 | 2 |" and "p (paired t)" in table
    assert (out / "study" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "study" / "study.md").read_text().count("| BiSSL+FT |") == 1
    assert written["targets"] == json.loads(json.dumps(result["targets"]))


def test_both_methods_get_the_same_seeds_and_data_order(tiny_study):
    _, _, seen, tests = tiny_study
    for epochs in (1.0, 2.0):
        runs = {m: [(s, order) for m_, e, s, order in seen if m_ == m and e == epochs]
                for m in ("Only-FT", "BiSSL+FT")}
        # one search trial (seed finetune.search_seed = 0), then the retrains of seeds 0 and 1
        assert [s for s, _ in runs["Only-FT"]] == [0, 0, 1]
        assert runs["Only-FT"] == runs["BiSSL+FT"]
    assert seen[1][3] != seen[2][3]  # another seed, another order
    # the test split is read only by the retrains: 2 budgets x 2 methods x 2 seeds
    assert sorted(t for t in tests if t != "val") == ["BiSSL+FT"] * 4 + ["Only-FT"] * 4


def test_a_killed_study_resumes_from_its_finished_cells(tiny_study, tmp_path, monkeypatch):
    base, uninterrupted, _, _ = tiny_study
    shutil.copytree(base, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("study"))
    args = sets(*TINY, *STUDY, f"run.out_dir={tmp_path}")
    cell, calls = study_module._run_cell, []

    def killed_after_first(recipe, target, epochs, method, *rest):
        if calls:
            raise KeyboardInterrupt("killed between cells")
        calls.append((epochs, method))
        return cell(recipe, target, epochs, method, *rest)

    monkeypatch.setattr(study_module, "_run_cell", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        run("study", *args)
    monkeypatch.setattr(study_module, "_run_cell", cell)
    first = tmp_path / "study" / "digits" / "e1_only_ft.json"
    assert calls == [(1.0, "Only-FT")] and first.exists() and not (tmp_path / ".lock").exists()
    assert not (tmp_path / "study" / "digits" / "e1_bissl_ft.json").exists()
    stamp = first.stat().st_mtime_ns
    resumed = run("study", *args)
    assert first.stat().st_mtime_ns == stamp  # not run again
    flags = [(r["epochs"], m, r["cells"][m]["reused"]) for r in resumed["targets"]["digits"]["rows"]
             for m in ("Only-FT", "BiSSL+FT")]
    assert flags == [(1.0, "Only-FT", True), (1.0, "BiSSL+FT", False), (2.0, "Only-FT", False),
                     (2.0, "BiSSL+FT", False)]
    for got, want in zip(resumed["targets"]["digits"]["rows"],
                         uninterrupted["targets"]["digits"]["rows"], strict=True):
        for method in ("Only-FT", "BiSSL+FT"):
            assert got["cells"][method]["runs"] == want["cells"][method]["runs"]
        assert got["comparison"] == want["comparison"]
    # a finished cell recorded under another configuration stops the study
    with pytest.raises(ConfigChanged, match="finetune.search_trials"):
        run("study", *args, "--set", "study.search_trials=2")
