"""The README: the usage example runs and prints a finite loss with CG diagnostics; the quick
start pins torch and states the measured costs as the results file holds them."""

import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "benchmarks" / "results" / "quickstart-cpu.json"


def test_readme_usage_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert torch.isfinite(out.loss)
    assert 1 <= out.info.iterations <= 5 and out.info.breakdown is None
    assert set(out.grads) == {"theta", "scale"}
    assert "SolveInfo" in capsys.readouterr().out


def test_readme_quick_start_commands_pin_torch():
    text = README.read_text()
    commands = [line for line in text.splitlines() if line.startswith("pip install torch==")]
    assert len(commands) == 2
    assert any("python recipes/vision_bissl.py" in c for c in commands)
    assert any("python -m pytest -q" in c for c in commands)


def _quickstart() -> str:
    text = README.read_text()
    return text[text.index("## Quick start"):text.index("## Usage")]


def test_readme_quick_start_states_the_measured_costs(facts):
    """Every number the quick start states is the one in the results file the timing script
    writes, and the skip reasons are those the tests give."""
    results = json.loads(QUICKSTART.read_text())
    text = " ".join(_quickstart().split())
    install, clone = results["install"], results["clean_clone"]
    tests = clone["tests"]
    assert f"{tests['passed']} passed and {tests['skipped']} skipped in " \
           f"{clone['minutes']['tests']} minutes on 2 idle CPU cores" in text
    assert f"about {clone['minutes']['ci_script']} minutes" in text
    assert f"{install['cuda_libraries_gb']} GB of them, with {install['triton_gb']} GB of triton " \
           f"and {install['torch_gb']} GB of torch itself" in text
    assert f"every extra measured {install['total_gb']} GB" in text
    for reason in tests["skip_reasons"]:
        assert f'"{reason.split(" (")[0]}"' in text, reason
    skipped = re.findall(r'"([^"]+ not installed)" \((\d+) tests?\)', text)
    assert sum(int(n) for _, n in skipped) == tests["skipped"]
    assert f"{facts.VISION_EMBEDDED_MINUTES} minutes on 2 idle CPU cores" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_readme_skip_reasons_are_the_tests_own():
    """The quoted reasons are what the peer-agreement tests and the JAXopt comparisons say when
    they skip."""
    source = (ROOT / "tests" / "test_benchmarks_smoke.py").read_text()
    template = re.search(r'pytest\.skip\(f"\{peer\} (is not installed[^"]*)"\)', source).group(1)
    calls = re.findall(r'_require_peer\(saved, "(\w+)"\)', source)
    results = json.loads(QUICKSTART.read_text())["clean_clone"]["tests"]
    jax_test = (ROOT / "tests" / "test_bilevel_jaxopt.py").read_text()
    jax_source = (ROOT / "benchmarks" / "bilevel_jaxopt.py").read_text()
    assert 'reason=f"JAXopt comparison skipped: {unavailable()}"' in jax_test
    assert 'return f"jax and jaxopt are not installed (' in jax_source
    jax = "JAXopt comparison skipped: jax and jaxopt are not installed"
    peers = sorted(r for r in results["skip_reasons"] if not r.startswith(jax))
    assert peers == sorted({f"{p} {template}" for p in calls})
    assert len(results["skip_reasons"]) - len(peers) == 1
    text = " ".join(_quickstart().split())
    for peer in set(calls):
        count = calls.count(peer)
        assert f'"{peer} is not installed" ({count} test{"s" if count > 1 else ""})' in text


def test_readme_counts_the_tests_that_need_the_docs_extra():
    """The tests of the built documentation skip without sphinx: as many as the README says."""
    source = (ROOT / "tests" / "test_docs_rendered.py").read_text()
    assert 'pytest.importorskip("sphinx")' in source
    single = re.findall(r"^def test_\w+\(built(?:, facts)?\)", source, re.M)
    per_example = re.findall(r'parametrize\("name", EXAMPLES\)\ndef test_\w+\(built, name\)',
                             source)
    count = len(single) + len(per_example) * len(list((ROOT / "examples").glob("*.py")))
    text = " ".join(_quickstart().split())
    assert f"the {count} tests of the built documentation (\"could not import 'sphinx'\")" in text


def test_readme_metrics_path_is_the_recipes():
    """The metrics path the README names is where the vision recipe's BiSSL stage logs."""
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "configs" / "vision_embedded.yaml").read_text())
    path = f"{config['run']['out_dir']}/{config['data']['downstream']}/bissl/metrics.jsonl"
    assert path in README.read_text()
    assert '"metrics.jsonl"' in (ROOT / "implicitbilevel" / "bissl" / "trainer.py").read_text()
    assert 'out_dir=self.path(target, "bissl")' in \
        (ROOT / "recipes" / "common" / "pipeline.py").read_text()


def test_readme_states_the_stored_embedded_vision_run():
    """The vision row of "What the embedded defaults show" is the stored run's
    (benchmarks/results/embedded-cpu.json, written by benchmarks/embedded_runs.py)."""
    run = json.loads((ROOT / "benchmarks" / "results" / "embedded-cpu.json").read_text())["vision"]
    digits, top1 = run["targets"]["digits"], run["comparisons"]["digits top1"]
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| vision, digits |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{run['wall_minutes']} min"
    assert cells[3] == (f"median {digits['median']:.2g}, max {digits['max']:.2g}; ≤ 0.1 in "
                        f"{digits['at_most_0_1']} of {digits['alternations']}")
    assert cells[4] == f"{digits['breakdowns']} of {digits['solves']}"
    verdict = "significant" if top1["significant"] else "not significant"
    assert cells[5] == (f"top-1 {100 * top1['mean_b']:.2f} ± {100 * top1['std_b']:.2f} vs "
                        f"{100 * top1['mean_a']:.2f} ± {100 * top1['std_a']:.2f} "
                        f"(p = {top1['p_value']:.2f}, {verdict})")
    ij = {"recycled-cg": "recycled CG", "cg": "CG", "minres": "MINRES"}[run["ij"]]
    assert cells[2].endswith(ij) and ("Gauss–Newton" in cells[2]) == (
        run["curvature"] == "gauss-newton")


def test_readme_states_the_stored_embedded_gpt_run():
    """The GPT row of "What the embedded defaults show" is the stored run's: its wall time, the
    residuals of every task's alternations together, and the comparison per task with Holm's
    adjustment over the seven tasks (scipy's paired t-tests are in the file; the adjustment is
    recomputed here by hand)."""
    run = json.loads((ROOT / "benchmarks" / "results" / "embedded-cpu.json").read_text())["gpt"]
    pooled = run["all_targets"]
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| GPT, 7 synthetic tasks |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{run['wall_minutes']} min"
    assert cells[2] == {"cg": "exact Hessian, CG", "minres": "exact Hessian, MINRES"}[run["ij"]]
    assert cells[3] == (f"median {pooled['median']:.2g}, max {pooled['max']:.2g}; ≤ 0.1 in "
                        f"{pooled['at_most_0_1']} of {pooled['alternations']}")
    assert cells[4] == f"{pooled['breakdowns']} of {pooled['solves']}"
    comps = {k: c for k, c in run["comparisons"].items() if c is not None}
    tested = {k: c for k, c in comps.items() if c["p_value"] is not None}
    order = sorted(tested, key=lambda k: tested[k]["p_value"])
    adjusted, running = {}, 0.0
    for i, k in enumerate(order):  # Holm's step-down
        running = max(running, min(1.0, (len(order) - i) * tested[k]["p_value"]))
        adjusted[k] = running
    ahead = sorted(k for k in adjusted if adjusted[k] < 0.05 and tested[k]["diff"] > 0)
    behind = sorted(k for k in adjusted if adjusted[k] < 0.05 and tested[k]["diff"] < 0)
    largest = max(tested, key=lambda k: abs(tested[k]["diff"]))
    alike = sorted(k for k, c in comps.items() if c["std_a"] == 0 and c["std_b"] == 0)
    verdict = (f"ahead on {', '.join(ahead) or 'none'}, behind on {', '.join(behind) or 'none'}"
               if ahead or behind else "no significant difference on any")
    verdict += (f" of the {len(comps)} tasks after Holm; largest: {largest} "
                f"{100 * tested[largest]['diff']:+.1f} points (adjusted p = "
                f"{adjusted[largest]:.2g})")
    if alike:
        verdict += f"; every seed alike on {', '.join(alike)}"
    assert cells[5] == verdict


def test_readme_states_the_stored_exact_hessian_run():
    """The README's sentence on exact-Hessian CG in the embedded vision configuration is the
    stored run's (benchmarks/results/recipe_ij_exact_hessian-cpu.json)."""
    runs = json.loads((ROOT / "benchmarks" / "results" / "recipe_ij_exact_hessian-cpu.json")
                      .read_text())["runs"]
    run = next(r for r in runs if r["label"] == "exact Hessian + CG, N_c = 5")
    above = sum(r > 1 for r in run["residuals"])
    sentence = (f"CG gives a median residual of {run['residual_median']:.2g}, above 1 in "
                f"{above} of {run['alternations']} alternations and {run['breakdowns']} "
                f"breakdowns in {2 * run['alternations']} solves")
    assert sentence in " ".join(README.read_text().split())
