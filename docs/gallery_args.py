"""The reduced sizes at which the documentation build runs the gallery's examples.

sphinx-gallery calls :func:`reset_argv` before each example (``sphinx_gallery_conf["reset_argv"]``
in ``conf.py``); the script parses these arguments as if they were typed after
``python examples/<name>.py``. The scripts' own defaults stay the full size.
"""

from __future__ import annotations

import os

#: Command-line arguments per example file: each runs in seconds on one CPU thread.
GALLERY_ARGV: dict[str, list[str]] = {
    "ridge_hyperparameter.py": ["--steps", "30"],
    "logreg_feature_penalties.py": ["--steps", "15"],
    "hyper_cleaning.py": ["--n-train", "200", "--steps", "20"],
    "imaml_sinusoid.py": ["--steps", "40", "--eval-tasks", "10", "--tasks-per-step", "3"],
    "hyper_cleaning_soba.py": ["--seconds", "1.5", "--n-train", "400"],
}


def reset_argv(gallery_conf: dict, script_vars: dict) -> list[str]:
    """The reduced-size arguments of the example ``script_vars["src_file"]``; one torch thread."""
    import torch

    torch.set_num_threads(1)
    return list(GALLERY_ARGV.get(os.path.basename(script_vars["src_file"]), []))
