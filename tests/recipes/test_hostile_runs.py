"""Runs that never lie: a run directory is guarded against changed configurations, overwrites
and a second command at the same time; a NaN/inf loss or weight stops the stage and nothing
non-finite is saved; non-finite config values fail at load."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import GPT_TINY, TINY, gpt_sets, run, sets
from tiny import load_gpt_script as _load_script

from recipes.common import load_checkpoint
from recipes.common.config import ConfigError
from recipes.common.fingerprint import ConfigChanged
from recipes.common.finite import NonFiniteStage
from recipes.common.run_lock import RunLocked

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")


@pytest.fixture
def pretext_run(tmp_path):
    args = sets(*TINY, f"run.out_dir={tmp_path}")
    run("pretext", *args)
    return tmp_path, args


def test_each_stage_records_its_configuration(pretext_run):
    out, _ = pretext_run
    record = json.loads((out / "pretext.pt.config.json").read_text())
    fp = record["fingerprint"]
    assert fp["pretext.epochs"] == 2 and fp["run.seed"] == 0
    assert "implicitbilevel.__version__" in fp
    assert not any(k.startswith(("bissl.", "finetune.", "sweep.", "run.out_dir")) for k in fp)
    assert not (out / ".lock").exists()  # released when the command ends


def test_resume_with_a_changed_config_stops_naming_the_keys(pretext_run):
    out, args = pretext_run
    before = (out / "pretext.pt").stat().st_mtime_ns
    with pytest.raises(ConfigChanged, match=r"pretext\.epochs: 2 -> 1") as err:
        run("pretext", "--resume", *args, *sets("pretext.epochs=1"))
    assert "--allow-changed-config" in str(err.value)
    assert (out / "pretext.pt").stat().st_mtime_ns == before
    # the explicit flag goes on (the finished stage is skipped) and is recorded
    run("pretext", "--resume", "--allow-changed-config", *args, *sets("pretext.epochs=1"))
    record = json.loads((out / "pretext.pt.config.json").read_text())
    assert record["fingerprint"]["pretext.epochs"] == 2  # what pretext.pt was made with
    assert record["allowed_changes"][0]["changes"] == ["pretext.epochs: 2 -> 1"]
    assert (out / "pretext.pt").stat().st_mtime_ns == before


def test_a_finished_stage_is_not_overwritten_without_a_flag(pretext_run):
    out, args = pretext_run
    before = (out / "pretext.pt").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        run("pretext", *args, *sets("pretext.epochs=1"))
    assert (out / "pretext.pt").stat().st_mtime_ns == before
    run("pretext", "--resume", *args)  # skipped
    assert (out / "pretext.pt").stat().st_mtime_ns == before
    run("pretext", "--overwrite", *args, *sets("pretext.epochs=1"))
    assert len(load_checkpoint(out / "pretext.pt")["losses"]) == 1
    record = json.loads((out / "pretext.pt.config.json").read_text())
    assert record["fingerprint"]["pretext.epochs"] == 1


def test_a_second_command_on_the_same_folder_stops_naming_the_first(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": os.getpid(), "host": os.uname().nodename, "start": "2026-01-01T00:00:00"}))
    with pytest.raises(RunLocked, match=f"process {os.getpid()} on {os.uname().nodename}"):
        run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}"))
    assert not (tmp_path / "pretext.pt").exists()
    assert (tmp_path / ".lock").exists()  # still the other command's


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": os.uname().nodename, "start": "2026-01-01T00:00:00"}))
    with pytest.warns(UserWarning, match=f"stale lock of process {dead.pid}"):
        run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}"))
    assert (tmp_path / "pretext.pt").exists() and not (tmp_path / ".lock").exists()


def test_resuming_bissl_under_another_lambda_stops_before_any_work(tmp_path, kill_bissl_at):
    args = sets(*TINY, f"run.out_dir={tmp_path}", "warmup.lr=0.1", "warmup.weight_decay=0.0")
    run("pretext", "head-warmup", *args)
    revive = kill_bissl_at("_lower_stage", 1)
    with pytest.raises(KeyboardInterrupt):
        run("bissl", *args)
    revive()
    ckpt = tmp_path / "digits" / "bissl" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    with pytest.raises(ConfigChanged, match=r"bissl\.lam: 0\.001 -> 0\.01"):
        run("bissl", "--resume", *args, *sets("bissl.lam=0.01"))
    assert ckpt.stat().st_mtime_ns == before
    assert load_checkpoint(ckpt)["alternation"] == 1
    run("bissl", "--resume", *args)
    assert load_checkpoint(ckpt)["alternation"] == 3
    assert torch.isfinite(load_checkpoint(tmp_path / "digits" / "bissl.pt")["pretext"][
        "backbone.stem.0.weight"]).all()


# -- non-finite values stop a stage; nothing non-finite is saved -------------------------------


def test_config_rejects_non_finite_floats_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"bissl\.lam: expected a finite number"):
        run("bissl", *sets(*TINY, f"run.out_dir={tmp_path}", "bissl.lam=.inf"))
    with pytest.raises(ConfigError, match=r"finetune\.lrs\[1\]"):
        run("only-ft", *sets(*TINY, f"run.out_dir={tmp_path}", "finetune.lrs=[0.1, .inf]"))


def test_a_diverging_pretext_stops_naming_stage_epoch_and_loss(tmp_path):
    with pytest.raises(NonFiniteStage, match=r"'pretext'.*loss is nan at epoch \d+, step \d+"):
        run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}", "pretext.lr=1e30"))
    assert not (tmp_path / "pretext.pt").exists()


def test_a_diverging_gpt_pretext_stops_naming_the_step(tmp_path):
    gpt = _load_script()
    with pytest.raises(NonFiniteStage, match=r"'pretext'.*at step \d+"):
        gpt.main(["pretext", *gpt_sets(*GPT_TINY, f"run.out_dir={tmp_path}", "pretrain.lr=1e30",
                                        "data.tasks=[sst2]")])
    assert not (tmp_path / "pretext.pt").exists()


def test_a_diverging_head_warmup_stops_naming_the_step(pretext_run):
    out, args = pretext_run
    with pytest.raises(NonFiniteStage, match=r"'head-warmup'.*step \d+"):
        run("head-warmup", *args, *sets("warmup.lr=1e38", "warmup.weight_decay=0.0",
                                        "warmup.epochs=4"))
    assert not (out / "digits" / "warmup.pt").exists()


def test_a_diverging_fine_tuning_stops_and_writes_nothing(pretext_run):
    out, args = pretext_run
    with pytest.raises(NonFiniteStage, match=r"'only-ft'"):
        run("only-ft", *args, *sets("finetune.search=none", "finetune.lr=1e30",
                                    "finetune.seeds=[0]"))
    assert not (out / "digits" / "only_ft.json").exists()
    assert not list((out / "digits").glob("checkpoints/*.pt"))


def test_a_diverging_bissl_stops_and_saves_no_weights(pretext_run):
    out, args = pretext_run
    args = [*args, *sets("warmup.lr=0.1", "warmup.weight_decay=0.0")]
    run("head-warmup", *args)
    with pytest.raises(FloatingPointError, match=r"(?i)lower|upper|non-finite"):
        run("bissl", *args, *sets("bissl.lower_lr=1e30"))
    assert not (out / "digits" / "bissl.pt").exists()


# -- data is validated before training ------------------------------------------------------


def _image_folder(root, splits):
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "a.png").write_bytes(b"")


def test_image_folder_splits_must_share_their_classes(tmp_path):
    from recipes.vision.data import downstream_datasets

    _image_folder(tmp_path / "ok", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    assert downstream_datasets("imagefolder", str(tmp_path / "ok"), None, None).num_classes == 2
    _image_folder(tmp_path / "bad", {"train": ["cat", "dog"], "val": ["cat", "dog"],
                                     "test": ["cat", "dgo"]})
    with pytest.raises(ValueError, match=r"test.*only in test: \['dgo'\].*missing from test: "
                                         r"\['dog'\].*data\.downstream_root"):
        downstream_datasets("imagefolder", str(tmp_path / "bad"), None, None)
    _image_folder(tmp_path / "one", {"train": ["cat"], "test": ["cat"]})
    with pytest.raises(ValueError, match="at least two"):
        downstream_datasets("imagefolder", str(tmp_path / "one"), None, None)


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("sst2", "sentence\tlabel\ngood\t1\nbad\tx\n", r"train\.tsv:3: column 'label' holds 'x'"),
        ("sst2", "sentence\tlabel\ngood\t7\n", r"train\.tsv:2: column 'label' holds class 7"),
        ("sst2", "text\tlabel\ngood\t1\n", r"train\.tsv:1: .*columns \['sentence'\]"),
        ("stsb", "sentence1\tsentence2\tscore\na\tb\tnan\n", r"train\.tsv:2: column 'score'"),
        ("cola", "src\t1\t\tok\nsrc\t2\t\tbad\n", r"train\.tsv:2: column 'label \(column 2\)'"),
        ("sst2", "sentence\tlabel\n", r"train\.tsv holds no sst2 example.*data\.glue"),
        ("cola", "", r"train\.tsv holds no cola example"),
    ],
    ids=["not-a-number", "class-out-of-range", "missing-column", "nan-score", "cola-label",
         "header-only", "empty"],
)
def test_glue_tsv_names_file_line_and_column(tmp_path, task, text, match):
    from recipes.nlp.glue import TSV_DIRS, load_glue_task
    from recipes.nlp.tasks import TASKS

    folder = tmp_path / TSV_DIRS[task]
    folder.mkdir()
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_glue_task(TASKS[task], str(tmp_path))


def test_the_missing_glue_message_names_an_existing_key(tmp_path):
    from recipes.nlp.config import DataConfig
    from recipes.nlp.glue import load_glue_task
    from recipes.nlp.hub import MissingResourceError
    from recipes.nlp.tasks import TASKS

    with pytest.raises(MissingResourceError) as err:
        load_glue_task(TASKS["rte"], str(tmp_path))
    assert "--glue" not in str(err.value) and "--set data.glue=" in str(err.value)
    assert "glue" in DataConfig.__dataclass_fields__


# -- a kill after the data passes have wrapped resumes bit-identically ------------------------


def _kill_resume_matches(main, args, target, out, kill_bissl_at, step, t, wrapped):
    whole, cut = out / "whole", out / "cut"
    main(["pretext", "head-warmup", *args, "--set", f"run.out_dir={whole}"])
    for name in ("pretext.pt", "tokenizer.json", f"{target}/warmup.pt", "pretext.pt.config.json",
                 f"{target}/warmup.pt.config.json"):  # the files and their run records
        if (whole / name).exists():
            (cut / name).parent.mkdir(parents=True, exist_ok=True)
            (cut / name).write_bytes((whole / name).read_bytes())
    main(["bissl", *args, "--set", f"run.out_dir={whole}"])
    revive = kill_bissl_at(step, t)
    with pytest.raises(KeyboardInterrupt):
        main(["bissl", *args, "--set", f"run.out_dir={cut}"])
    revive()
    state = load_checkpoint(cut / target / "bissl" / "checkpoint.pt")
    assert state["alternation"] == t
    passes = {k: state["ranks"][0][k]["passes"] for k in ("upper_stack", "lower_stack")}
    assert all(passes[k] >= n for k, n in wrapped.items()), passes  # wrapped before the kill
    main(["bissl", "--resume", *args, "--set", f"run.out_dir={cut}"])
    for part in ("pretext", "downstream"):
        a = load_checkpoint(whole / target / "bissl.pt")[part]
        b = load_checkpoint(cut / target / "bissl.pt")[part]
        for name, tensor in a.items():
            assert torch.equal(b[name], tensor), (part, name)
    history = [json.loads(line)["alternation"] for line in
               (cut / target / "bissl" / "metrics.jsonl").read_text().splitlines()]
    assert history == list(range(5))


def test_vision_kill_after_wrapped_passes_resumes_exactly(tmp_path, kill_bissl_at):
    # 128 pretext images / 32 = 4 lower batches a pass, 2 a stage: the lower data wraps after
    # alternation 1; 32 training images / 20 = 1 upper batch a pass, 2 a stage: it wraps in
    # every alternation. The kill comes mid-alternation 3, in the second lower pass.
    args = sets(*TINY, "bissl.alternations=5", "warmup.lr=0.1", "warmup.weight_decay=0.0")
    _kill_resume_matches(lambda argv: run(*argv), args, "digits", tmp_path, kill_bissl_at,
                         "_upper_stage", 3, {"upper_stack": 2, "lower_stack": 2})


def test_gpt_kill_after_wrapped_passes_resumes_exactly(tmp_path, kill_bissl_at):
    gpt = _load_script()
    args = gpt_sets(*GPT_TINY, "data.tasks=[stsb]", "bissl.alternations=5",
                    "bissl.upper_batch_size=32", "warmup.lr=0.001", "warmup.weight_decay=0.0")
    # 64 training pairs / 32 = 2 upper batches a pass, 1 a stage: the upper data wraps after
    # alternation 1. The lower corpus holds T·(N_L + 1) batches a pass by design, so it never
    # wraps within a run; the kill comes in its first pass.
    _kill_resume_matches(gpt.main, args, "stsb", tmp_path, kill_bissl_at, "_lower_stage", 3,
                         {"upper_stack": 2})


# -- images are verified up front; a short corpus is read again ---------------------------------


def _real_images(root, splits, bad=()):
    from PIL import Image

    for split in splits:
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (40 * i, 90 * c, 7)).save(root / split / name / f"{i}.png")
    for path, data in bad:
        (root / path).write_bytes(data)


def test_images_are_verified_up_front_when_asked(tmp_path):
    from recipes.vision.config import DataConfig
    from recipes.vision.data import downstream_datasets, pretext_dataset
    from recipes.vision.loaders import build_loaders

    _real_images(tmp_path, ("train", "test"))
    png = (tmp_path / "train" / "cat" / "0.png").read_bytes()
    (tmp_path / "train" / "dog" / "1.png").write_bytes(png[: len(png) // 2])  # truncated
    (tmp_path / "test" / "cat" / "2.png").write_bytes(b"")  # empty
    cfg = DataConfig(pretext="imagefolder", pretext_root=str(tmp_path / "train"),
                     downstream="imagefolder", downstream_root=str(tmp_path),
                     image_size=8, test_resize=8, workers=0, verify_images="fail")
    with pytest.raises(ValueError, match=r"dog/1\.png: not a usable image.*data\.verify_images="
                                         "skip"):
        build_loaders(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"test/cat/2\.png: not a usable image \(empty file\)"):
        pretext_dataset("imagefolder", str(tmp_path / "test"), None, verify="fail")
    with pytest.warns(UserWarning, match=r"left out 1 of 10 pretext images"):
        pre = pretext_dataset("imagefolder", str(tmp_path / "train"), None, verify="skip")
    assert len(pre) == 9 and all(pre[i].size == (8, 8) for i in range(9))  # each one decodes
    with pytest.warns(UserWarning) as caught:
        data = downstream_datasets("imagefolder", str(tmp_path), None, None, verify="skip")
    said = {str(w.message).split(" images")[0].split("left out ")[1] for w in caught}
    assert said in ({"1 of 2 downstream val", "1 of 10 downstream test"},
                    {"1 of 8 downstream train", "1 of 10 downstream test"})
    assert len(data.train) + len(data.val) == 9 and len(data.test) == 9
    assert data.num_classes == 2
    unchecked = downstream_datasets("imagefolder", str(tmp_path), None, None)
    assert len(unchecked.test) == 10  # verify_images=none (default) checks nothing


def test_a_pretext_corpus_shorter_than_a_pass_is_read_again(tmp_path):
    from recipes.nlp.config import DataConfig
    from recipes.nlp.data import pretext_chunks, pretext_loader
    from recipes.nlp.synthetic import pretext_corpus
    from recipes.nlp.tokenizer import bpe_from_json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(pretext_corpus(900, seed=3)))  # 900 sentences
    gpt = _load_script()
    out = tmp_path / "run"
    args = gpt_sets(*GPT_TINY, "data.tasks=[sst2]", f"data.corpus={corpus}",
                    "bissl.alternations=8", "bissl.lower_steps=5", "bissl.lower_batch_size=16",
                    "warmup.lr=0.001", "warmup.weight_decay=0.0", f"run.out_dir={out}")
    gpt.main(["pretext", "head-warmup", "bissl", *args])
    encoder = bpe_from_json((out / "tokenizer.json").read_text())
    chunks = len(pretext_chunks(DataConfig(corpus=str(corpus)), encoder, 48))
    assert chunks < 8 * (5 + 1) * 16  # one lower pass needs more chunks than the corpus holds
    state = load_checkpoint(out / "sst2" / "bissl" / "checkpoint.pt")
    assert state["alternation"] == 8 and state["ranks"][0]["lower_stack"]["passes"] == 1
    assert torch.isfinite(load_checkpoint(out / "sst2" / "bissl.pt")["pretext"][
        "gpt.transformer.tokens_embed.weight"]).all()
    tiny = tmp_path / "tiny.txt"  # not even one batch: rejected up front, sizes and keys named
    tiny.write_text(pretext_corpus(12, seed=3)[0])
    with pytest.raises(ValueError, match=r"gives \d+ chunks of 48 tokens, fewer than one batch of "
                                         r"16: use a larger data\.corpus"):
        pretext_loader(DataConfig(corpus=str(tiny)), encoder, 48, 16, 4)
