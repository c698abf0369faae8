"""The summary sentences come from ``study.json`` alone, and the pages that quote a study agree
with the stored results (a planted contradiction is caught)."""

import json
import math

import numpy as np
import pytest

from recipes.common import conclusions as cc
from recipes.common.stats import adjust_study, replicate_comparison


def _study(shifts, correction="holm", noise=0.01, seed=0):
    """A study of one target with a budget per shift (BiSSL+FT - Only-FT in points / 100)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, shift in enumerate(shifts):
        a = 0.7 + rng.normal(0, 0.02, (5, 4))
        b = a + shift + rng.normal(0, noise, (5, 1)) + rng.normal(0, 0.005, (5, 4))
        rows.append({"epochs": float(i + 1), "Only-FT": a.tolist(), "BiSSL+FT": b.tolist(),
                     "comparison": replicate_comparison(a, b, bootstrap=100)})
    targets = {"digits": {"metric": "top1", "rows": rows}}
    adjust_study(targets, correction, 0.05)
    return {"targets": targets, "epochs": [r["epochs"] for r in rows], "replicates": 5,
            "seeds": [0, 1, 2, 3], "alpha": 0.05, "correction": correction,
            "wall_seconds": 60.0}


def test_one_significant_cell_after_correction_gives_exactly_one_ahead_sentence():
    study = _study([0.05, 0.0, 0.004, -0.002, 0.0])
    comps = [r["comparison"] for r in study["targets"]["digits"]["rows"]]
    assert [c["significant"] for c in comps] == [True, False, False, False, False]
    lines = cc.conclusions(study)
    ahead = [s for s in lines if "BiSSL+FT is ahead of" in s]
    assert len(ahead) == 1 and ahead[0].startswith("digits, 1 fine-tuning epochs: ")
    assert "Holm-adjusted p = " in ahead[0] and "d_z = " in ahead[0]
    assert sum("is level with" in s for s in lines) == 4
    assert lines[0].startswith("Over 5 cells") and "ahead in 1, level in 4 and behind in 0" in \
        lines[0]
    assert "seed spread" in lines[-1]


def test_behind_and_undefined_cells():
    study = _study([-0.05, 0.0])
    row = study["targets"]["digits"]["rows"][1]
    a = np.array(row["Only-FT"])
    row["comparison"] = replicate_comparison(a, a + 0.01)  # the same shift everywhere
    adjust_study(study["targets"], "holm", 0.05)
    lines = cc.conclusions(study)
    assert any(s.startswith("digits, 1 fine-tuning epochs: BiSSL+FT is behind Only-FT by")
               for s in lines)
    undefined = [s for s in lines if s.startswith("digits, 2 fine-tuning")]
    assert undefined and "no variance: test undefined" in undefined[0]
    table = cc.study_table(study["targets"]["digits"]["rows"])
    assert "no variance: test undefined" in table
    assert table.count("**") == 2  # only Only-FT at the first budget is bold


@pytest.mark.parametrize("fmt", ["md", "rst"])
def test_the_page_check_catches_a_planted_contradiction(fmt, tmp_path):
    study = _study([0.05, 0.0, 0.0])
    begin, end = cc._markers("vision", fmt)
    page = f"Intro.\n\n{begin}\n\nold text\n\n{end}\n\nOutro.\n"
    page = cc.replace_block(page, "vision", fmt, cc.render_block(study, fmt))
    assert cc.check_page(page, {"vision": study}, fmt) == []
    path = tmp_path / f"page.{fmt}"
    # a contradiction inside the generated block
    path.write_text(page.replace("BiSSL+FT is ahead of Only-FT", "BiSSL+FT is behind Only-FT"))
    errors = cc.check_page(path.read_text(), {"vision": study}, fmt)
    assert any("block differs" in e for e in errors)
    assert any("the stored study says ahead" in e for e in errors)
    # a hand-written claim outside the block
    path.write_text(page + "\nAt this scale digits, 3 fine-tuning epochs: BiSSL+FT is ahead of "
                    "Only-FT, as the thesis finds.\n")
    errors = cc.check_page(path.read_text(), {"vision": study}, fmt)
    assert errors == ["'digits, 3 fine-tuning epochs: BiSSL+FT is ahead of': the stored study "
                      "says level"]


@pytest.mark.parametrize("name", list(cc.STUDIES))
def test_the_pages_agree_with_the_stored_studies(name):
    path = cc.STUDIES[name]
    if not path.exists():
        pytest.skip(f"{path} not stored")
    studies = {n: json.loads(p.read_text()) for n, p in cc.STUDIES.items() if p.exists()}
    for page in cc.PAGES[name]:
        fmt = "md" if page.suffix == ".md" else "rst"
        text = page.read_text()
        assert cc._markers(name, fmt)[0] in text, f"{page} has no generated study:{name} block"
        assert cc.check_page(text, studies, fmt) == [], page


def test_the_gpt_study_covers_all_seven_tasks_and_their_seeds_differ():
    """Every task of the embedded generator, at every budget, gives different scores over the
    fine-tuning seeds within the replicates, for both methods, so no cell is degenerate."""
    path = cc.STUDIES["gpt"]
    if not path.exists():
        pytest.skip(f"{path} not stored")
    study = json.loads(path.read_text())
    assert set(study["targets"]) == {"cola", "sst2", "rte", "qnli", "mrpc", "qqp", "stsb"}
    for task, entry in study["targets"].items():
        for row in entry["rows"]:
            c = row["comparison"]
            assert min(c["within_std_only_ft"], c["within_std_bissl_ft"]) > 0, (
                f"{task} at {row['epochs']:g} epochs: every seed of one method alike")
            assert not c["degenerate"]


def test_a_stored_study_is_what_the_current_analysis_says_of_its_scores():
    """The stored studies were reanalysed by the current statistics (``reanalyse``): doing it
    again changes no figure and keeps every score."""
    for path in cc.STUDIES.values():
        study = json.loads(path.read_text())
        again = cc.reanalyse(study)
        for name, entry in study["targets"].items():
            for old, new in zip(entry["rows"], again["targets"][name]["rows"], strict=True):
                assert (new["Only-FT"], new["BiSSL+FT"]) == (old["Only-FT"], old["BiSSL+FT"])
                for key in ("diff", "p_value", "p_adjusted", "d_z", "spread_ratio"):
                    a, b = old["comparison"][key], new["comparison"][key]
                    assert a == b or (a is not None and b is not None and math.isclose(a, b)
                                      ) or (a != a and b != b), (path.name, name, key)
                assert old["comparison"]["d_z_ci"] == new["comparison"]["d_z_ci"]
