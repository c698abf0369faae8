"""The measured facts the documentation states, each stated once.

The pages read them as substitutions (``|hvp_kept_resnet|``; see ``rst_prolog`` in ``conf.py``);
``README.md``, the config comments and the module docstrings that repeat one are checked against
this file by ``tests/test_docs.py``. The HVP ratios are read from the committed benchmark run
(``benchmarks/results/quick-cpu.json``, written by ``python benchmarks/run.py --quick``).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_QUICK = json.loads((ROOT / "benchmarks" / "results" / "quick-cpu.json").read_text())


def _ratio(workload: str, mode: str) -> str:
    return f"{_QUICK['hvp_solver'][workload]['hvp_over_gradient'][mode]:.2f}"


#: One Hessian-vector product over one gradient, ResNet-18 (batch 32, 32×32, one thread) and the
#: small GPT (2 layers, 64 wide, batch 16×64), by how the product is formed.
HVP = {
    "kept_resnet": _ratio("resnet", "kept-graph"),
    "rr_resnet": _ratio("resnet", "reverse-over-reverse"),
    "fr_resnet": _ratio("resnet", "forward-over-reverse"),
    "kept_gpt": _ratio("gpt", "kept-graph"),
    "rr_gpt": _ratio("gpt", "reverse-over-reverse"),
    "fr_gpt": _ratio("gpt", "forward-over-reverse"),
}

#: Wall time of ``python recipes/vision_bissl.py`` (every stage, vision_embedded.yaml) on 2 CPU
#: cores, as measured and stated in the config's header comment.
VISION_EMBEDDED_MINUTES = "3.4"



#: Wall time of ``python recipes/vision_bissl.py study`` (vision_embedded.yaml) on 2 shared CPU
#: cores for the replicates of the stored study, from an empty run folder (the config's comment
#: states it).
STUDY_MINUTES = "70"

#: Wall time of ``python recipes/gpt_glue_bissl.py study`` (gpt_glue_embedded.yaml, all seven
#: tasks) on 2 shared CPU cores for the replicates of the stored study, summed over the
#: invocations that made them (the stored study.json's own wall time is the last one's).
GPT_STUDY_MINUTES = "41"

#: Wall time of ``python recipes/gpt_glue_bissl.py`` (every stage, all seven embedded tasks,
#: gpt_glue_embedded.yaml) on 2 CPU cores, as stated in the config's header comment.
GPT_EMBEDDED_MINUTES = "7.8"

#: Data roots in the examples. torchvision's OxfordIIITPet(root) reads
#: ``<root>/oxford-iiit-pet/{images,annotations}``, so the Pets root is the folder above it.
PETS_ROOT = "/data"
PETS_LAYOUT = "oxford-iiit-pet/{images,annotations}"
CORPUS_ROOT = "/data/bookcorpus"

#: Spellings that contradicted these facts and must not come back.
RETIRED = ["2.2-2.35", "/data/pets", "data.corpus=/data/books ", "8-10 minutes",
           "5 to 8 minutes", "~5 min", "~30 min", "about 30 minutes"]


def substitutions() -> dict[str, str]:
    """The reST substitutions the pages use, name to text."""
    subs = {f"hvp_{k}": v for k, v in HVP.items()}
    subs.update(vision_embedded_minutes=VISION_EMBEDDED_MINUTES,
                gpt_embedded_minutes=GPT_EMBEDDED_MINUTES, study_minutes=STUDY_MINUTES,
                gpt_study_minutes=GPT_STUDY_MINUTES,
                pets_root=PETS_ROOT,
                corpus_root=CORPUS_ROOT)
    return subs


def rst_prolog() -> str:
    """``.. |name| replace:: text`` for every substitution."""
    return "\n".join(f".. |{k}| replace:: {v}" for k, v in substitutions().items()) + "\n"
