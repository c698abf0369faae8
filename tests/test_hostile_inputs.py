"""Hostile inputs to the library's run state: a metrics log that must match the checkpoint after
a kill or a failed save, and two corrupt checkpoint files."""

from __future__ import annotations

import json

import pytest
import torch
from test_bissl import _Pair

from implicitbilevel.bissl import BiSSLTrainer
from implicitbilevel.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _alternations(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().strip().splitlines()
    return [json.loads(line)["alternation"] for line in lines]


def test_a_failed_save_then_a_resume_logs_each_alternation_once(tmp_path, monkeypatch):
    original, calls = BiSSLTrainer.save, []

    def failing(self):
        calls.append(self.alternation)
        if len(calls) == 2:  # the save after alternation 1 fails (e.g. a full disk)
            raise OSError("no space left on device")
        original(self)

    monkeypatch.setattr(BiSSLTrainer, "save", failing)
    with pytest.raises(OSError, match="no space"):
        _Pair(out_dir=tmp_path).trainer().run()
    monkeypatch.setattr(BiSSLTrainer, "save", original)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["alternation"] == 1
    assert _alternations(tmp_path) == [0, 1]  # alternation 1 logged, its save failed
    history = _Pair(out_dir=tmp_path).trainer().run(resume=True)
    assert [h["alternation"] for h in history] == [0, 1, 2, 3]
    assert _alternations(tmp_path) == [0, 1, 2, 3]


def test_a_kill_between_checkpoints_then_a_resume_logs_each_alternation_once(tmp_path,
                                                                             monkeypatch):
    original = BiSSLTrainer._upper_stage

    def killed(self, t):
        if t == 3:
            raise KeyboardInterrupt
        return original(self, t)

    pair = _Pair(out_dir=tmp_path)
    pair.config.checkpoint_every = 2
    monkeypatch.setattr(BiSSLTrainer, "_upper_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        pair.trainer().run()
    monkeypatch.setattr(BiSSLTrainer, "_upper_stage", original)
    assert _alternations(tmp_path) == [0, 1, 2]  # alternation 2 logged, not checkpointed
    assert load_checkpoint(tmp_path / "checkpoint.pt")["alternation"] == 2
    resumed = _Pair(out_dir=tmp_path)
    resumed.config.checkpoint_every = 2
    history = resumed.trainer().run(resume=True)
    assert [h["alternation"] for h in history] == [0, 1, 2, 3]
    assert _alternations(tmp_path) == [0, 1, 2, 3]


def test_both_checkpoint_files_corrupt_is_not_called_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"a": torch.ones(3)}, path)
    save_checkpoint({"a": torch.full((3,), 2.0)}, path)
    for name in ("ckpt.pt", "ckpt.pt.prev"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:20])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "intact" not in str(err.value) and "corrupt too" in str(err.value)
