"""The examples in the API reference: every docstring example of the library runs and prints what
it shows, and every public name the reference documents carries one."""

import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import implicitbilevel

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"

#: The type aliases, which hold no docstring of their own.
ALIASES = {"HVPMode", "Params"}


def _documented() -> dict[str, object]:
    """Every name the API pages document with ``auto*`` directives, resolved to its object."""
    names: dict[str, object] = {}
    for page in sorted(API.glob("*.rst")):
        module = "implicitbilevel"
        for line in page.read_text().splitlines():
            current = re.match(r"\.\. currentmodule:: (\S+)", line)
            if current:
                module = current.group(1)
            auto = re.match(r"\.\. auto(class|function|exception):: (\S+)", line)
            if auto:
                path = f"{module}.{auto.group(2)}"
                mod, _, attr = path.rpartition(".")
                names[path] = getattr(importlib.import_module(mod), attr)
    return names


def _modules() -> list[str]:
    """The modules that define the documented objects (the deprecated aliases are left out)."""
    objects = [getattr(implicitbilevel, n) for n in implicitbilevel.__all__]
    objects += list(_documented().values())
    return sorted({o.__module__ for o in objects if getattr(o, "__module__", "").startswith(
        "implicitbilevel")})


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for test in tests:
            runner.run(test, out=lambda text: None)
    finally:
        torch.set_num_threads(threads)
    failed = [t.name for t in tests if runner._name2ft.get(t.name, (0, 0))[0]]
    assert runner.failures == 0, f"{runner.failures} failing examples in {failed}"


def test_every_documented_public_name_has_an_example():
    public = {n: getattr(implicitbilevel, n) for n in implicitbilevel.__all__}
    public.update(_documented())
    missing = sorted(name for name, obj in public.items()
                     if name not in ALIASES
                     and ">>>" not in (inspect.getdoc(obj) or ""))
    assert not missing, f"no example in the docstring of {missing}"
