"""A tiny end-to-end run of the GPT-GLUE recipe (embedded data, every stage, seconds)."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "gpt_glue_bissl.py"

TINY = [
    "data.tasks=[sst2, stsb]", "data.embedded_train=80", "data.embedded_test=40",
    "data.embedded_corpus_sentences=600", "model.context=48", "model.width=16", "model.layers=1",
    "model.heads=2", "model.bpe_vocab=200", "pretrain.steps=5", "finetune.epochs=1",
    "finetune.lrs=[1.0e-3]", "finetune.weight_decays=[0.01]", "finetune.seeds=[0, 1]",
    "finetune.evals_per_epoch=2", "bissl.alternations=2", "bissl.lower_steps=2",
    "bissl.upper_steps=1", "bissl.lower_batch_size=4", "bissl.cg_iters=2", "bissl.damping=100.0",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpt_glue_bissl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_table_results_and_plots(tmp_path, capsys):
    script = _load_script()
    results = script.main([*TINY, f"out_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert "Only FT" in printed and "BiSSL + FT" in printed and "stsb" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == results["table"]
    for task in ("sst2", "stsb"):
        entry = saved["tasks"][task]
        for pipeline in ("only_ft", "bissl_ft"):
            runs = entry[pipeline]["runs"]
            assert len(runs) == 2 and all(math.isfinite(r["test"]) for r in runs)
            summary = entry[pipeline]["summary"]["test"]
            assert summary["n"] == 2 and summary["std"] >= 0
        assert len(entry["bissl_history"]) == 2
        assert (tmp_path / "plots" / f"{task}.png").stat().st_size > 0
        assert (tmp_path / "bissl" / task / "metrics.jsonl").read_text().count("\n") == 2
    accuracy = saved["summary"]["Only FT"]["sst2"]["mean"]
    assert 0.0 <= accuracy <= 1.0
    assert len(saved["pretrain_loss"]) == 5
    from tokenizers import Tokenizer  # the run's tokenizer is saved and reproduces its ids

    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    assert 0 < size <= 200  # model.bpe_vocab above
    ids = tokenizer.encode("the film was great").ids
    assert ids and max(ids) < size
