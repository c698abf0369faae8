"""The recipes' ``--help`` and ``--help-config``: plain text, every command and sweep, every
config key with the model's default."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from recipes.common.cli import COMMANDS, parse_args
from recipes.common.config import load_config
from recipes.common.help import config_keys, plain
from recipes.common.sweep import SWEEPS
from recipes.nlp.config import RecipeConfig
from recipes.vision.config import VisionConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"vision_bissl": (VisionConfig, "vision_embedded.yaml"),
           "gpt_glue_bissl": (RecipeConfig, "gpt_glue_embedded.yaml")}
SPHINX = re.compile(r"``|:(mod|func|class|meth|data|attr|doc|ref|math):`")


def _help(recipe: str, *args: str, capsys, monkeypatch) -> str:
    """What ``python recipes/<recipe>.py ARGS`` prints from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "100")
    module = importlib.import_module(f"recipes.{recipe}")
    with pytest.raises(SystemExit) as stop:
        module.main(list(args))
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


def test_plain_strips_roles_and_literals():
    text = plain("``pretext`` (:mod:`recipes.common.pipeline`, :func:`~a.b.run`)::\n")
    assert text == "pretext (recipes.common.pipeline, run):\n"


def _leaves(obj, prefix=""):
    """Every leaf key of a config instance with its value, by dataclass introspection."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("cls", [VisionConfig, RecipeConfig])
def test_config_keys_cover_the_model_with_its_defaults(cls):
    expected = _leaves(load_config(None, cls))
    listed = {e["key"]: e["default"] for e in config_keys(cls) if "key" in e}
    assert listed == expected
    lam = next(e for e in config_keys(cls) if e.get("key") == "bissl.lam")
    assert lam["bounds"] == ["> 0.0"] and lam["type"] == "float" and "λ" in lam["doc"]


def test_parse_args_help_config_without_class_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help-config"], ROOT / "recipes" / "configs" / "vision_embedded.yaml")
    assert "config class" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_help_is_plain_and_names_every_command_and_sweep(recipe, capsys, monkeypatch):
    text = _help(recipe, "--help", capsys=capsys, monkeypatch=monkeypatch)
    assert not SPHINX.search(text), SPHINX.search(text).group(0)
    for command in COMMANDS:
        assert re.search(rf"^  {re.escape(command)}\s", text, re.M), command
    for name in SWEEPS:
        assert re.search(rf"^  {name}\s", text, re.M), name
    assert "--help-config" in text
    assert re.search(r"^  lam\s.*Table 6\.2", text, re.M)
    assert re.search(r"^  lam_init\s.*(\n\s+.*)*Table\s+F\.8", text, re.M)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_help_config_lists_every_key_and_the_configs_values(recipe, capsys, monkeypatch):
    cls, name = RECIPES[recipe]
    text = _help(recipe, "--help-config", capsys=capsys, monkeypatch=monkeypatch)
    assert not SPHINX.search(text)
    defaults = _leaves(load_config(None, cls))
    loaded = _leaves(load_config(ROOT / "recipes" / "configs" / name, cls))
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  (\S+)  .*$", text, re.M)}
    assert set(lines) == set(defaults)
    for key, value in defaults.items():
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) \
            else repr(value) if isinstance(value, str) else str(value)
        assert f"default {shown}" in lines[key], key
        if loaded[key] != value:
            assert f"{name}:" in lines[key], key
        else:
            assert f"{name}:" not in lines[key], key
