"""Every config input refused by name: ``--set`` values that are not YAML, a ``#`` that YAML
would cut as a comment, a ``--config`` file that is not text, an empty or repeated
``data.tasks``; and the run-folder lock held by one process at a time (two real processes)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import TINY, run, sets
from tiny import load_gpt_script as _load_script

from recipes.common import ConfigError, load_config
from recipes.common.run_lock import RunLock, RunLocked
from recipes.nlp.config import RecipeConfig
from recipes.vision.config import VisionConfig

RUN_LOCK = Path(__file__).resolve().parents[2] / "recipes" / "common" / "run_lock.py"


def test_a_set_value_that_is_not_yaml_names_the_set_item(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'bissl\.lam=\[1,': the value is not valid YAML"):
        run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}", "bissl.lam=[1,"))
    with pytest.raises(ConfigError, match=r"--set 'run\.device=a\\tb': the value is not valid"):
        load_config(None, VisionConfig, ["run.device=a\tb"])
    assert not (tmp_path / "pretext.pt").exists()


def test_a_hash_in_a_set_value_is_kept_not_cut_as_a_comment():
    for value in ("runs/a #b", '"runs/a #b"', "'runs/a #b'", "  runs/a #b  "):
        cfg = load_config(None, VisionConfig, [f"run.out_dir={value}"])
        assert cfg.run.out_dir == "runs/a #b", value
    assert load_config(None, VisionConfig, ["run.out_dir=#b"]).run.out_dir == "#b"
    assert load_config(None, VisionConfig, ["run.out_dir=a#b"]).run.out_dir == "a#b"
    with pytest.raises(ConfigError, match=r"search_seed: expected an integer, got '1 #b'"):
        load_config(None, VisionConfig, ["finetune.search_seed=1 #b"])
    # after a list or a quoted string the '#' would be dropped: refused, naming the item
    for item in ("finetune.seeds=[0, 1] #b", "run.out_dir='a' #b"):
        with pytest.raises(ConfigError, match=re.escape(f"--set {item!r}: the '#' after")):
            load_config(None, VisionConfig, [item])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"is not UTF-8 text \(byte 0x89 at offset 0\)"),
        ("data:\n  pretext: digits\n".encode("utf-16"), r"is not UTF-8 text \(byte 0xff"),
        (b"data: \x00\x01\x02\n", r"not valid YAML"),
    ],
    ids=["png", "utf-16", "nul-bytes"],
)
def test_a_config_file_that_is_not_yaml_text_is_refused_naming_it(tmp_path, data, match):
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=match) as err:
        run("pretext", "--config", str(path), *sets(f"run.out_dir={tmp_path / 'out'}"))
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ("[]", r"^data\.tasks is empty: name at least one GLUE task of \['cola'"),
        ("[rte, sst2, RTE]", r"^data\.tasks names GLUE task 'rte' twice \('rte' and 'RTE'\)"),
        ("[sst2, sst2]", r"^data\.tasks names GLUE task 'sst2' twice"),
        ("[STS-B, stsb]", r"^data\.tasks names GLUE task 'stsb' twice \('STS-B' and 'stsb'\)"),
        ("[mnli]", r"^data\.tasks: unknown GLUE task 'mnli'"),
    ],
)
def test_gpt_tasks_may_not_be_empty_or_repeated(tmp_path, tasks, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, RecipeConfig, [f"data.tasks={tasks}"])
    with pytest.raises(ConfigError, match=match):  # before the run folder is made
        _load_script().main(["pretext", *sets(f"run.out_dir={tmp_path / 'run'}",
                                              f"data.tasks={tasks}")])
    assert not (tmp_path / "run").exists()
    assert load_config(None, RecipeConfig, ["data.tasks=[rte, STS-B]"]).data.tasks == [
        "rte", "STS-B"]


# -- the run-folder lock: two real processes -------------------------------------------------

HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])  # without torch
    run_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_lock)
    RunLock, RunLocked = run_lock.RunLock, run_lock.RunLocked
    sys.stdin.readline()  # start together
    try:
        lock = RunLock(sys.argv[1]).acquire()
    except RunLocked as err:
        print("locked", err, flush=True)
        sys.exit(0)
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
    lock.release()
""")


def _holders(folder, n):
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", HOLDER, str(folder),
                               str(RUN_LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for p in procs:  # every process is started before any one tries
        p.stdin.write("go\n")
    for p in procs:
        p.stdin.flush()
    return procs, [p.stdout.readline().strip() for p in procs]


def _end(procs):
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=60) == 0


def test_a_second_process_stops_naming_the_folder_and_the_holder(tmp_path):
    procs, said = _holders(tmp_path, 1)
    assert said == ["held"]
    holder = procs[0].pid
    with pytest.raises(RunLocked, match=rf"{re.escape(str(tmp_path))} is in use by process "
                                        rf"{holder} on "):
        RunLock(tmp_path).acquire()
    with pytest.raises(RunLocked, match=rf"process {holder} .*use another run\.out_dir"):
        run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}"))
    assert not (tmp_path / "pretext.pt").exists()
    _end(procs)
    assert not (tmp_path / ".lock").exists()  # released and removed by its holder
    with RunLock(tmp_path) as lock:
        assert lock.held
    assert not lock.held


def test_a_killed_holder_frees_the_folder_at_once(tmp_path):
    procs, said = _holders(tmp_path, 1)
    assert said == ["held"]
    procs[0].kill()
    procs[0].wait()
    with pytest.warns(UserWarning, match=f"stale lock of process {procs[0].pid}"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_processes_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": os.uname().nodename, "start": "2026-01-01T00:00:00"}))
    procs, said = _holders(tmp_path, 4)
    try:
        assert sorted(s.split()[0] for s in said) == ["held", "locked", "locked", "locked"], said
        holder = procs[[s.split()[0] for s in said].index("held")].pid
        # named once its record is written; "another command" in the moment before
        assert all(f"process {holder} on" in s or "in use by another command" in s
                   for s in said if s != "held"), said
    finally:
        _end(procs)
