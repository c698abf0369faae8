"""The embedded-run summary that README.md and the docs read: residual statistics and the method
comparison taken from a run folder, against numpy on a run folder this test writes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import embedded_runs  # noqa: E402


def _run_folder(tmp_path, residuals, breakdowns):
    run = tmp_path / "run"
    (run / "digits" / "bissl").mkdir(parents=True)
    lines = [json.dumps({"alternation": t, "ij_relative_residual": r, "solver_breakdowns": b,
                         "ij_exact_relative_residual": 1.0, "hessian_products": 11,
                         "solver_iterations": 5.0, "seconds": 1.5})
             for t, (r, b) in enumerate(zip(residuals, breakdowns))]
    (run / "digits" / "bissl" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    comparison = {"n": 3, "mean_a": 0.8, "std_a": 0.02, "mean_b": 0.85, "std_b": 0.01,
                  "diff": 0.05, "diff_std": 0.01, "p_value": 0.03, "significant": True}
    results = {"config": {"bissl": {"ij": "recycled-cg", "curvature": "gauss-newton",
                                    "cg_iters": 5, "upper_steps": 2}},
               "targets": {"digits": {}}, "comparisons": {"digits top1": comparison},
               "wall_seconds": 12.5}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_summary_matches_numpy_on_a_written_run(tmp_path):
    rng = np.random.default_rng(0)
    residuals = list(rng.uniform(0.0, 0.2, size=9))
    breakdowns = [0, 1, 0, 0, 2, 0, 0, 0, 0]
    summary = embedded_runs.summarize(_run_folder(tmp_path, residuals, breakdowns))
    digits = summary["targets"]["digits"]
    assert digits["median"] == float(np.median(residuals))
    assert digits["max"] == float(np.max(residuals))
    assert digits["at_most_0_1"] == int(np.sum(np.asarray(residuals) <= 0.1))
    assert (digits["breakdowns"], digits["solves"], digits["alternations"]) == (3, 18, 9)
    assert summary["ij"] == "recycled-cg" and summary["pipeline_wall_seconds"] == 12.5
    assert summary["comparisons"]["digits top1"]["p_value"] == 0.03
    assert "diff_std" not in summary["comparisons"]["digits top1"]


def test_the_stored_vision_run_is_the_embedded_config():
    """The stored measurement was made with the IJ the embedded configuration selects now."""
    import yaml

    stored = json.loads(embedded_runs.RESULTS.read_text())["vision"]
    config = yaml.safe_load((ROOT / "recipes" / "configs" / "vision_embedded.yaml").read_text())
    assert (stored["ij"], stored["curvature"], stored["cg_iters"]) == (
        config["bissl"]["ij"], config["bissl"]["curvature"], config["bissl"]["cg_iters"])
    digits = stored["targets"]["digits"]
    assert digits["alternations"] == config["bissl"]["alternations"]
    assert digits["solves"] == config["bissl"]["alternations"] * config["bissl"]["upper_steps"]


def test_a_changed_default_is_not_stored_as_the_default(tmp_path):
    """``--set`` without ``--key`` would overwrite the embedded default's entry: refused before
    anything runs."""
    with pytest.raises(SystemExit, match="--key"):
        embedded_runs.main(["vision", "--set", "bissl.ij=mfac", "--out", str(tmp_path / "r")])
    # nor may a run take the other recipe's entry
    with pytest.raises(SystemExit, match="--key 'gpt'"):
        embedded_runs.main(["vision", "--key", "gpt", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
