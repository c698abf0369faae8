"""Run records that cannot lie: a stage's record is written after its outputs with their digests;
every stage verifies the records of its inputs (digests and the settings they were made with),
``--resume`` verifies what it skips, a killed stage leaves no record, sweep values run again
under a changed configuration, and every JSON file a run writes is strict JSON."""

import json
import shutil

import pytest
from tiny import TINY, run, sets

from recipes.common import load_checkpoint, save_checkpoint
from recipes.common.fingerprint import ConfigChanged
from recipes.common.pipeline import Recipe
from recipes.common.records import (
    DigestMismatch,
    InputReplaced,
    LegacyRecord,
    Unrecorded,
    sha256,
)
from recipes.vision_bissl import VisionRecipe

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

FAST = ["warmup.lr=0.1", "warmup.weight_decay=0.0", "finetune.search=none", "finetune.seeds=[0]"]


def _record(path):
    return json.loads(path.with_name(path.name + ".config.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every stage of a tiny run, finished (λ = 0.001)."""
    out = tmp_path_factory.mktemp("records")
    run("pretext", "only-ft", "head-warmup", "bissl", "finetune",
        *sets(*TINY, *FAST, f"run.out_dir={out}"))
    return out


@pytest.fixture
def copied(finished, tmp_path):
    """A copy of the finished run (records included) and its arguments."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, sets(*TINY, *FAST, f"run.out_dir={out}")


def test_records_hold_the_digests_and_inputs_of_what_was_written(copied):
    out, _ = copied
    record = _record(out / "digits" / "bissl.pt")
    assert record["format"] == 2 and record["stage"] == "bissl"
    assert record["fingerprint"]["bissl.lam"] == pytest.approx(1e-3)
    assert record["outputs"] == {name: sha256(out / name) for name in
                                 ("digits/bissl.pt", "digits/bissl_history.json")}
    assert set(record["inputs"]) == {"pretext.pt", "digits/warmup.pt"}
    assert record["inputs"]["pretext.pt"]["sha256"] == {"pretext.pt": sha256(out / "pretext.pt")}
    pretext = _record(out / "pretext.pt")
    assert set(pretext["outputs"]) == {"pretext.pt", "pretext_baseline.pt"}
    assert "finetune.seeds" not in record["fingerprint"]  # BiSSL does not depend on them


# -- a killed --overwrite leaves no record that a later --resume trusts ----------------------


def test_a_stage_killed_after_writing_weights_leaves_no_record(copied, monkeypatch):
    out, args = copied
    pretrain = VisionRecipe.pretrain

    def killed_before_the_baseline(self, model, extra=False):
        if extra:  # pretext.pt is written; pretext_baseline.pt is still the old one
            raise KeyboardInterrupt("killed")
        return pretrain(self, model, extra)

    monkeypatch.setattr(VisionRecipe, "pretrain", killed_before_the_baseline)
    with pytest.raises(KeyboardInterrupt):
        run("pretext", "--overwrite", *args, *sets("pretext.epochs=1"))
    monkeypatch.setattr(VisionRecipe, "pretrain", pretrain)
    assert len(load_checkpoint(out / "pretext.pt")["losses"]) == 1  # the new weights
    assert len(load_checkpoint(out / "pretext_baseline.pt")["losses"]) == 3  # the old ones
    assert not (out / "pretext.pt.config.json").exists()
    with pytest.raises(Unrecorded, match=r"stage 'only-ft' \(digits\): its input "
                                         r"pretext_baseline\.pt has no run record"):
        run("only-ft", "--overwrite", *args, *sets("pretext.epochs=1"))
    run("pretext", "--resume", *args, *sets("pretext.epochs=1"))  # not finished: run again
    assert len(load_checkpoint(out / "pretext_baseline.pt")["losses"]) == 2  # 1 + 1 extra
    record = _record(out / "pretext.pt")
    assert record["fingerprint"]["pretext.epochs"] == 1
    assert record["outputs"]["pretext_baseline.pt"] == sha256(out / "pretext_baseline.pt")


def test_a_stage_killed_before_writing_keeps_the_old_record(copied, monkeypatch):
    out, args = copied
    before = (out / "pretext.pt").read_bytes()
    monkeypatch.setattr(VisionRecipe, "pretrain", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        run("pretext", "--overwrite", *args, *sets("pretext.epochs=1"))
    monkeypatch.undo()
    assert (out / "pretext.pt").read_bytes() == before
    assert _record(out / "pretext.pt")["fingerprint"]["pretext.epochs"] == 2  # still true
    with pytest.raises(ConfigChanged, match=r"pretext\.epochs: 2 -> 1"):
        run("pretext", "--resume", *args, *sets("pretext.epochs=1"))


def test_a_killed_bissl_overwrite_is_never_recorded_under_its_new_settings(copied,
                                                                           kill_bissl_at):
    out, args = copied
    revive = kill_bissl_at("_upper_stage", 1)  # killed in the trainer: bissl.pt untouched
    with pytest.raises(KeyboardInterrupt):
        run("bissl", "--overwrite", *args, *sets("bissl.lam=0.5"))
    revive()
    assert _record(out / "digits" / "bissl.pt")["fingerprint"]["bissl.lam"] == 0.001  # true
    with pytest.raises(ConfigChanged, match=r"its input digits/bissl\.pt was made with a "
                                            r"different configuration[^\n]*\n  bissl\.lam: "
                                            r"0\.001 -> 0\.5"):
        run("finetune", "--overwrite", *args, *sets("bissl.lam=0.5"))
    with pytest.raises(ConfigChanged, match=r"trainer checkpoint was made with a different "
                                            r"configuration[^\n]*\n  bissl\.lam: 0\.5 -> 0\.001"):
        run("bissl", "--resume", "--overwrite", *args)
    done = Recipe._bissl_done

    def killed_after_saving(self, *a):
        done(self, *a)
        raise KeyboardInterrupt("killed after bissl.pt was written")

    Recipe._bissl_done = killed_after_saving
    try:
        with pytest.raises(KeyboardInterrupt):  # continues the killed run, then is killed
            run("bissl", "--resume", "--overwrite", *args, *sets("bissl.lam=0.5"))
    finally:
        Recipe._bissl_done = done
    assert not (out / "digits" / "bissl.pt.config.json").exists()  # λ = 0.5's weights
    with pytest.raises(Unrecorded, match=r"its input digits/bissl\.pt has no run record"):
        run("finetune", "--overwrite", *args, *sets("bissl.lam=0.5"))
    run("bissl", "--resume", *args, *sets("bissl.lam=0.5"))  # not finished: finished now
    assert load_checkpoint(out / "digits" / "bissl" / "checkpoint.pt")["alternation"] == 3
    assert _record(out / "digits" / "bissl.pt")["fingerprint"]["bissl.lam"] == 0.5


# -- a stage refuses inputs made under other settings, or changed after their record ---------


def test_finetune_after_bissl_under_another_lambda_is_refused_naming_the_setting(copied):
    out, args = copied
    result = out / "digits" / "bissl_ft.json"
    result.unlink()
    with pytest.raises(ConfigChanged, match=r"stage 'finetune' \(digits\): its input "
                                            r"digits/bissl\.pt was made with a different "
                                            r"configuration[^\n]*\n  bissl\.lam: 0\.001 -> 0\.5\n"):
        run("finetune", *args, *sets("bissl.lam=0.5"))
    assert not result.exists()
    run("finetune", "--allow-changed-config", *args, *sets("bissl.lam=0.5"))
    record = _record(result)
    assert record["allowed_changes"][-1]["input"] == "digits/bissl.pt"
    assert record["allowed_changes"][-1]["changes"] == ["bissl.lam: 0.001 -> 0.5"]
    assert record["fingerprint"]["bissl.lam"] == 0.001  # what its input was made with
    # a later --resume under λ = 0.5 is told again
    with pytest.raises(ConfigChanged, match=r"bissl\.lam: 0\.001 -> 0\.5"):
        run("finetune", "--resume", *args, *sets("bissl.lam=0.5"))


def test_finetune_refuses_a_replaced_bissl_output_naming_the_file(copied):
    out, args = copied
    state = load_checkpoint(out / "digits" / "bissl.pt")
    name = next(iter(state["pretext"]))
    state["pretext"][name] = state["pretext"][name] + 1.0
    save_checkpoint(state, out / "digits" / "bissl.pt")
    with pytest.raises(DigestMismatch, match=r"stage 'finetune' \(digits\): digits/bissl\.pt is "
                                             r"not the file digits/bissl\.pt\.config\.json "
                                             r"describes .*replaced or altered after stage "
                                             r"'bissl' finished"):
        run("finetune", "--overwrite", *args)
    with pytest.raises(DigestMismatch, match=r"digits/bissl\.pt is not the file"):
        run("bissl", "finetune", "--resume", *args)  # nor does --resume skip it


def test_the_report_refuses_a_file_changed_after_its_record(copied):
    out, args = copied
    run("report", *args)
    history = out / "digits" / "bissl_history.json"
    history.write_text(history.read_text().replace("0.001", "0.002", 1))
    with pytest.raises(DigestMismatch, match=r"digits/bissl_history\.json is not the file"):
        run("report", *args)


def test_a_finished_stage_made_from_a_replaced_input_is_not_reused(copied):
    out, args = copied
    longer = [*args, *sets("warmup.epochs=2")]
    run("head-warmup", "--overwrite", *longer)  # a new warmup.pt: bissl.pt was made from the old
    with pytest.raises(InputReplaced, match=r"stage 'bissl' \(digits\): the outputs were made "
                                            r"from files that have been replaced since:\n  "
                                            r"digits/warmup\.pt: sha256"):
        run("bissl", "--resume", *longer)
    with pytest.raises(InputReplaced, match=r"its input digits/bissl\.pt was made from files"):
        run("finetune", "--overwrite", *longer)


def test_an_old_run_folder_is_refused_with_a_clear_message(copied):
    out, args = copied
    record = _record(out / "pretext.pt")
    (out / "pretext.pt.config.json").write_text(json.dumps(
        {"stage": "pretext", "fingerprint": record["fingerprint"], "allowed_changes": []}))
    with pytest.raises(LegacyRecord, match=r"written before its stage ran .*--overwrite"):
        run("only-ft", "--overwrite", *args)
    with pytest.raises(LegacyRecord, match=r"older version of the recipes"):
        run("pretext", "--resume", *args)
    run("pretext", "--resume", "--allow-changed-config", *args)  # trusted, recorded, upgraded
    upgraded = _record(out / "pretext.pt")
    assert upgraded["format"] == 2 and upgraded["outputs"]["pretext.pt"] == sha256(
        out / "pretext.pt")
    assert "trusted" in upgraded["allowed_changes"][-1]["changes"][0]
    run("only-ft", "--overwrite", *args)


# -- sweeps -------------------------------------------------------------------------------------


def test_sweep_values_run_again_under_a_changed_configuration(copied, monkeypatch):
    out, args = copied
    calls = []
    stage_bissl = Recipe.stage_bissl
    monkeypatch.setattr(Recipe, "stage_bissl", lambda self, t, resume=False: (
        calls.append(self.cfg.bissl.lower_lr), stage_bissl(self, t, resume))[1])
    sweep = ["sweep", "--param", "upper_steps", *args, *sets("sweep.upper_steps=[1]")]
    run(*sweep)
    run(*sweep)
    assert calls == [1.0]  # the second sweep reuses the value's stages
    cell = out / "sweep_upper_steps" / "1" / "digits"
    result = run(*sweep, *sets("bissl.lower_lr=0.5", "finetune.seeds=[0, 1]"))
    assert calls == [1.0, 0.5]  # run again under the new setting, not reused
    assert _record(cell / "bissl.pt")["fingerprint"]["bissl.lower_lr"] == 0.5
    assert [r["seed"] for r in json.loads((cell / "bissl_ft.json").read_text())["runs"]] == [0, 1]
    # Only-FT is the base run's (seeds [0]) for every value: said, not hidden
    assert result["reference_changes"] == {"digits": ["finetune.seeds: [0] -> [0, 1]"]}


# -- strict JSON -----------------------------------------------------------------------------


def _refuse(name):
    raise ValueError(f"not strict JSON: {name}")


def test_every_json_file_of_a_run_is_strict_json(copied):
    out, args = copied
    run("report", *args)
    files = [*out.rglob("*.json"), *out.rglob("*.jsonl")]
    assert len(files) >= 10
    for path in files:
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in lines:
            json.loads(line, parse_constant=_refuse)
