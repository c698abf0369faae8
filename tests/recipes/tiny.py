"""Tiny settings and runners shared by the recipe tests (a helper module, not a test module).

``TINY``/``run``/``sets``: the vision recipe at seconds-scale settings; ``GPT_TINY``,
``gpt_sets`` and ``load_gpt_script``: the GPT-GLUE recipe's.
"""

import importlib.util
from pathlib import Path

import torch

from recipes import vision_bissl

TINY = [
    "data.image_size=8", "data.test_resize=8", "data.digits_pretext=128", "data.digits_train=40",
    "data.digits_val=30", "model.width=4", "model.proj_dim=16", "pretext.epochs=2",
    "pretext.baseline_extra_epochs=1",
    "pretext.batch_size=64", "pretext.warmup_epochs=1", "finetune.epochs=2",
    "finetune.batch_size=20", "finetune.search_trials=2", "finetune.search_epochs=1",
    "finetune.seeds=[0, 1, 2]", "warmup.epochs=1", "bissl.alternations=3", "bissl.lower_steps=2",
    "bissl.upper_steps=2", "bissl.lower_batch_size=32", "bissl.upper_batch_size=20",
    "bissl.lower_warmup_alternations=1", "run.threads=1", "run.progress=false",
]  # fmt: skip


def sets(*overrides):
    """``--set`` arguments."""
    return [a for o in overrides for a in ("--set", o)]


def run(*argv):
    """Run the vision recipe's command line in-process, restoring the thread count."""
    threads = torch.get_num_threads()
    try:
        return vision_bissl.main(list(argv))
    finally:
        torch.set_num_threads(threads)


SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "gpt_glue_bissl.py"

GPT_TINY = [
    "data.tasks=[sst2, stsb]", "data.embedded_train=80", "data.embedded_test=40",
    "data.embedded_corpus_sentences=600", "model.context=48", "model.width=16", "model.layers=1",
    "model.heads=2", "model.bpe_vocab=200", "pretrain.steps=5", "finetune.epochs=1",
    "finetune.lrs=[1.0e-3, 3.0e-3]", "finetune.weight_decays=[0.01]", "finetune.seeds=[0, 1]",
    "finetune.evals_per_epoch=2", "bissl.alternations=3", "bissl.lower_steps=2",
    "bissl.upper_steps=1", "bissl.lower_batch_size=4", "bissl.cg_iters=2", "bissl.damping=100.0",
    "bissl.checkpoint_every=1", "run.progress=false",
]  # fmt: skip


def load_gpt_script():
    """The GPT-GLUE recipe script loaded as a module."""
    spec = importlib.util.spec_from_file_location("gpt_glue_bissl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt_sets = sets
