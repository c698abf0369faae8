"""recipes.common: typed configs, search, aggregation, reports and checkpoints."""

import json
import math
import statistics
from dataclasses import dataclass

import pytest
import torch

from recipes.common import (
    CheckpointError,
    ConfigError,
    aggregate,
    field,
    format_table,
    load_checkpoint,
    load_config,
    log_uniform_grid,
    plot_bars,
    plot_curves,
    random_search,
    save_checkpoint,
    seed_everything,
    write_json,
)


@dataclass
class Inner:
    lr: float = field(0.1, gt=0)
    mode: str = field("a", choices=("a", "b"))
    sizes: list[int] = field([1, 2], ge=1)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    epochs: int = field(3, ge=1)
    flag: bool = False
    note: str | None = None


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-3\n  mode: b\nepochs: 7\n")  # PyYAML reads 1e-3 as a str
    cfg = load_config(path, Outer, overrides=["inner.sizes=[4, 5]", "flag=true"])
    assert cfg.inner.lr == 1e-3 and cfg.inner.mode == "b" and cfg.inner.sizes == [4, 5]
    assert cfg.epochs == 7 and cfg.flag is True and cfg.note is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("inner:\n  lrr: 1\n", "unknown key 'inner.lrr'"),
        ("inner:\n  lr: -1\n", "inner.lr: -1.0 is out of range"),
        ("inner:\n  mode: c\n", "inner.mode: 'c' is not one of"),
        ("inner:\n  sizes: [1, 0]\n", "inner.sizes: 0 is out of range"),
        ("epochs: 2.5\n", "epochs: expected an integer"),
        ("flag: 1\n", "flag: expected true/false"),
        ("- 1\n", "top level must be a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, Outer)


def test_config_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", Outer)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, Outer, overrides=["epochs"])


def test_log_uniform_grid_ranges_and_spread():
    pairs = log_uniform_grid(2000, (1e-4, 1.0), (1e-5, 1e-2), seed=3)
    lrs = [math.log10(lr) for lr, _ in pairs]
    assert all(-4 <= v <= 0 for v in lrs)
    assert all(1e-5 <= wd <= 1e-2 for _, wd in pairs)
    # log-uniform: the decades are about equally populated, the mean log is the midpoint
    assert statistics.fmean(lrs) == pytest.approx(-2.0, abs=0.1)
    assert sum(v < -3 for v in lrs) / len(lrs) == pytest.approx(0.25, abs=0.04)
    assert pairs == log_uniform_grid(2000, (1e-4, 1.0), (1e-5, 1e-2), seed=3)


def test_random_search_sorts_best_first():
    trials = random_search(
        lambda lr, wd: {"acc": -abs(math.log10(lr) + 2)},
        8,
        (1e-4, 1.0),
        (1e-5, 1e-2),
        score_key="acc",
    )
    scores = [t.score for t in trials]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(KeyError, match="acc"):
        random_search(lambda lr, wd: {"x": 1.0}, 1, (0.1, 1), (0.1, 1), score_key="acc")


def test_aggregate_and_table():
    summary = aggregate([{"acc": 0.5, "loss": 1.0}, {"acc": 0.7, "loss": 3.0}, {"acc": 0.6}])
    assert set(summary) == {"acc"}  # loss is missing in one run
    assert summary["acc"]["mean"] == pytest.approx(0.6)
    assert summary["acc"]["std"] == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    table = format_table({"A": summary}, ["acc"], scale=100)
    assert "60.00 ± 10.00" in table.splitlines()[2]


def test_write_json_and_plots(tmp_path):
    path = write_json({"x": float("nan"), "t": torch.tensor(2.5), "l": [1, 2]}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"x": None, "t": 2.5, "l": [1, 2]}
    summary = {"A": aggregate([{"acc": 0.5}, {"acc": 0.6}]), "B": aggregate([{"acc": 0.7}])}
    for png in (
        plot_bars(summary, "acc", tmp_path / "a.png"),
        plot_curves({"loss": [3, 2, 1], "lam": [1e-3] * 3}, tmp_path / "c.png", logy=("lam",)),
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    state = {"w": torch.arange(4.0), "meta": {"epoch": 3}}
    path = save_checkpoint(state, tmp_path / "sub" / "ck.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == {"epoch": 3}
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temp file left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_seed_everything_reproduces():
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError):
        seed_everything(-1)
