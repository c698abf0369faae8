"""The paper configurations run their BiSSL stage as configured: each file loads, and its BiSSL
stage runs two alternations on tiny stand-in networks and data with the IJ the file selects
(MINRES on the exact Hessian, bf16 where the file asks for it), logging the residual of the
solved system, the residual on the exact-Hessian system and the cosine between u and v."""

import json
import math
from pathlib import Path

import pytest
from tiny import GPT_TINY, TINY, gpt_sets, load_gpt_script, run, sets

from recipes.common import load_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")]

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
#: Stand-ins for the paper data and networks (nothing downloaded): the embedded digits and the
#: small ResNet, at the tiny settings of the other recipe tests.
VISION_STANDINS = ["data.pretext=digits", "data.downstream=digits", "data.pretext_root=''",
                   "data.downstream_root=''", "data.workers=0", "data.blur_kernel=3",
                   "model.backbone=small-resnet", "run.device=cpu"]
GPT_STANDINS = ["model.pretrained=null", "data.glue=embedded", "data.corpus=embedded",
                "run.device=cpu"]


def _check_records(bissl_dir: Path, solver: str) -> None:
    lines = (bissl_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == 2
    for r in records:
        assert 0 <= r["ij_relative_residual"] < 1.5
        assert math.isfinite(r["ij_exact_relative_residual"])
        assert -1 <= r["ij_cosine_u_v"] <= 1
        assert r["solver_breakdowns"] == 0
    settings = load_checkpoint(bissl_dir / "checkpoint.pt")["settings"]
    assert settings["solver"].startswith(solver) and settings["curvature"] == "hessian"


@pytest.mark.parametrize("name", ["vision_default.yaml", "vision_small.yaml"])
def test_vision_paper_config_bissl_stage(tmp_path, name):
    out = tmp_path / "run"
    run("--config", str(CONFIGS / name), "pretext", "head-warmup", "bissl",
        *sets(*TINY, *VISION_STANDINS, "bissl.alternations=2", f"run.out_dir={out}"))
    _check_records(out / "digits" / "bissl", "MINRES")


def test_gpt_paper_config_bissl_stage(tmp_path):
    out = tmp_path / "run"
    script = load_gpt_script()
    script.main(["--config", str(CONFIGS / "gpt_glue_paper.yaml"), "pretext", "only-ft",
                 "head-warmup", "bissl", *gpt_sets(*GPT_TINY, *GPT_STANDINS, "data.tasks=[sst2]",
                                    "bissl.alternations=2", f"run.out_dir={out}")])
    _check_records(out / "sst2" / "bissl", "MINRES")
