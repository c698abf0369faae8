"""The replicated study end to end on tiny settings: independent replicates, seeds nested and
paired, the Only-FT baseline per replicate, kill-and-resume from finished replicates."""

import json
import shutil

import pytest
import torch
from tiny import TINY, run, sets

from recipes.common.fingerprint import ConfigChanged
from recipes.common.pipeline import Recipe
from recipes.common.replicates import finetune_seeds, replicate_folder, replicate_seed

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

R = 3
STUDY = ["study.epochs=[1, 2]", "study.seeds=[0, 1]", "study.search_trials=1",
         "study.bootstrap=200", f"study.replicates={R}"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One uninterrupted tiny study and, per fine-tuning call, (replicate seed, method, epochs,
    source file, seeds)."""
    out = tmp_path_factory.mktemp("study")
    calls: list[tuple] = []
    mp = pytest.MonkeyPatch()
    fine_tune = Recipe.fine_tune

    def traced(self, target, source, name, *args, **kwargs):
        calls.append((self.cfg.run.seed, name, kwargs["ft"].epochs, source,
                      list(kwargs["ft"].seeds)))
        return fine_tune(self, target, source, name, *args, **kwargs)

    mp.setattr(Recipe, "fine_tune", traced)
    try:
        result = run("study", *sets(*TINY, *STUDY, f"run.out_dir={out}"))
    finally:
        mp.undo()
    return out, result, calls


def _state(path):
    return torch.load(path, weights_only=True)


def test_the_study_writes_replicate_level_results(tiny_study):
    out, result, _ = tiny_study
    written = json.loads((out / "study" / "study.json").read_text())
    assert written["replicates"] == R and written["correction"] == "holm"
    assert written["replicate_seeds"] == [replicate_seed(0, r) for r in range(R)]
    rows = written["targets"]["digits"]["rows"]
    assert [r["epochs"] for r in rows] == [1.0, 2.0]
    for row in rows:
        assert len(row["Only-FT"]) == R and all(len(s) == 2 for s in row["BiSSL+FT"])
        c = row["comparison"]
        assert c["replicates"] == R and c["seeds"] == 2 and "p_adjusted" in c
        for r, cells in enumerate(row["cells"]):
            want = finetune_seeds(replicate_seed(0, r), [0, 1])
            for method in ("Only-FT", "BiSSL+FT"):
                assert [run_["seed"] for run_ in cells[method]["runs"]] == want
    text = (out / "study" / "study.md").read_text()
    assert "digits, 1 fine-tuning epochs: " in text and "| p t (Holm-adjusted) |" in text
    assert (out / "study" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert written["targets"] == json.loads(json.dumps(result["targets"]))


def test_replicates_are_independent(tiny_study):
    out, _, _ = tiny_study
    folders = [replicate_folder(out, r) for r in range(R)]
    bissl = [_state(f / "digits" / "bissl.pt")["pretext"] for f in folders]
    key = next(k for k, v in bissl[0].items() if v.is_floating_point())
    for i in range(R):
        for j in range(i + 1, R):
            assert not torch.equal(bissl[i][key], bissl[j][key])  # different BiSSL outcomes
    warm = [_state(f / "digits" / "warmup.pt")["downstream"] for f in folders]
    assert not torch.equal(warm[0]["head.weight"], warm[1]["head.weight"])
    base = [_state(f / "pretext_baseline.pt")["pretext"][key] for f in folders]
    assert not torch.equal(base[0], base[1])  # the Only-FT extra pretraining is replicated
    shared = [(f / "pretext.pt").read_bytes() for f in folders]
    assert shared[0] == shared[1] == (out / "pretext.pt").read_bytes()  # one pretext model


def test_seeds_are_nested_and_paired_within_a_replicate(tiny_study):
    out, _, calls = tiny_study
    for r in range(R):
        seed = replicate_seed(0, r)
        mine = [c for c in calls if c[0] == seed]
        assert len(mine) == 4  # two budgets, two methods
        only = {c[3] for c in mine if c[1] == "Only-FT"}
        # the same replicate seed gives the same Only-FT baseline at every budget
        assert only == {replicate_folder(out, r) / "pretext_baseline.pt"}
        assert {c[3] for c in mine if c[1] == "BiSSL+FT"} == {
            replicate_folder(out, r) / "digits" / "bissl.pt"}
        assert all(c[4] == finetune_seeds(seed, [0, 1]) for c in mine)
    assert len({tuple(c[4]) for c in calls}) == R  # every replicate has its own seeds


def test_a_killed_study_resumes_from_its_finished_replicates(tiny_study, tmp_path, monkeypatch):
    _, uninterrupted, _ = tiny_study
    args = sets(*TINY, *STUDY, f"run.out_dir={tmp_path}")
    stage_bissl, seen = Recipe.stage_bissl, []

    def killed_in_replicate_1(self, target, resume=False):
        seen.append(self.cfg.run.seed)
        if self.cfg.run.seed == replicate_seed(0, 1):
            raise KeyboardInterrupt("killed in replicate 1")
        return stage_bissl(self, target, resume)

    monkeypatch.setattr(Recipe, "stage_bissl", killed_in_replicate_1)
    with pytest.raises(KeyboardInterrupt):
        run("study", *args)
    monkeypatch.setattr(Recipe, "stage_bissl", stage_bissl)
    done = replicate_folder(tmp_path, 0) / "digits" / "bissl.pt"
    assert done.exists() and not (replicate_folder(tmp_path, 1) / "digits" / "bissl.pt").exists()
    stamp = done.stat().st_mtime_ns
    reran = []
    monkeypatch.setattr(Recipe, "stage_bissl",
                        lambda self, t, resume=False: (reran.append(self.cfg.run.seed),
                                                       stage_bissl(self, t, resume)))
    resumed = run("study", *args)
    assert done.stat().st_mtime_ns == stamp
    assert reran == [replicate_seed(0, 1), replicate_seed(0, 2)]  # replicate 0 reused
    for got, want in zip(resumed["targets"]["digits"]["rows"],
                         uninterrupted["targets"]["digits"]["rows"], strict=True):
        assert got["Only-FT"] == want["Only-FT"] and got["BiSSL+FT"] == want["BiSSL+FT"]
        assert got["comparison"] == want["comparison"]
    # a finished cell recorded under another configuration stops the study
    shutil.rmtree(tmp_path / "study" / "digits" / "r0", ignore_errors=False)
    with pytest.raises(ConfigChanged, match="finetune.search_trials"):
        run("study", *args, "--set", "study.search_trials=2")
    # --allow-changed-config never reuses such a cell: it runs again under the new settings,
    # and its record says so (the stored result is what the current settings made).
    cell = tmp_path / "study" / "digits" / "r1" / "e1_bissl_ft.json"
    before = json.loads(cell.read_text())
    run("study", *args, "--set", "study.search_trials=2", "--allow-changed-config")
    record = json.loads((cell.parent / (cell.name + ".config.json")).read_text())
    assert record["format"] == 2 and record["stage"] == "finetune"
    trials = [v for k, v in _flatten(record["fingerprint"]).items() if k.endswith("search_trials")]
    assert trials and set(trials) == {2}, record["fingerprint"]
    assert json.loads(cell.read_text())["wall_seconds"] != before["wall_seconds"]  # rerun


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
