"""The README's usage example runs and prints a finite loss with CG diagnostics."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


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
