"""The GPT-GLUE recipe under ``torchrun``: two gloo ranks on CPU against one process.

The search trials and seed runs are spread over the ranks but seeded independently of them, so
the Only-FT grid and seed results of the two-rank run equal those of one process; BiSSL runs
data-parallel; pretraining and the head warm-up run on rank 0; rank 0 alone writes the results.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_gpt_end_to_end import TINY as E2E_TINY
from test_gpt_end_to_end import sets as _sets
from tiny import load_gpt_script as _load_script

from implicitbilevel.bissl.checkpoint import load_checkpoint
from recipes.common import RankFailure, map_over_ranks, per_rank_batch_size
from recipes.common.bissl_stage import bissl_batch_sizes
from recipes.nlp.config import RecipeConfig

pytestmark = pytest.mark.slow  # whole runs in subprocesses; see the README

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "gpt_glue_bissl.py"

ALTERNATIONS = 2
TINY = [  # the end-to-end run's tiny settings, on one task
    *(o for o in E2E_TINY if not o.startswith(("data.tasks=", "bissl.alternations="))),
    "data.tasks=[stsb]", f"bissl.alternations={ALTERNATIONS}", "run.threads=1", "run.device=cpu",
]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_two_ranks_match_one_process_and_rank0_writes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    two = tmp_path / "two_ranks"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), *_sets(*TINY, f"run.out_dir={two}")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"two-rank run: {wall:.1f} s")
    # rank 0 alone prints the table and writes the results
    assert done.stdout.count("Test scores") == 1, done.stdout
    assert "2 ranks" in done.stdout
    saved = json.loads((two / "results.json").read_text())
    assert saved["world_size"] == 2 and (two / "tokenizer.json").is_file()
    assert (two / "plots" / "stsb.png").stat().st_size > 0

    one = _load_script().main(_sets(*TINY, f"run.out_dir={tmp_path / 'one_rank'}"))

    entry, single = saved["targets"]["stsb"], one["targets"]["stsb"]
    only = entry["only_ft"]
    assert len(only["search"]) == 2 and len(only["runs"]) == 2 and only["trials"] == 2
    assert only["search"] == single["only_ft"]["search"]  # same trials, order and scores
    assert only["runs"] == single["only_ft"]["runs"]
    assert (only["lr"], only["weight_decay"]) == (single["only_ft"]["lr"],
                                                  single["only_ft"]["weight_decay"])
    assert saved["pretext_losses"] == one["pretext_losses"]
    runs = entry["bissl_ft"]["runs"]
    assert len(runs) == 2 and all(math.isfinite(r["test_pearson"]) for r in runs)
    assert entry["bissl_ft"]["summary"]["test_pearson"]["n"] == 2
    assert entry["bissl_ft"]["trials"] == 2  # BiSSL+FT repeats the search on the ranks too

    history = entry["bissl_history"]
    assert [h["alternation"] for h in history] == list(range(ALTERNATIONS))
    for h in history:
        assert math.isfinite(h["upper_loss"]) and math.isfinite(h["lower_loss"])
    metrics = (two / "stsb" / "bissl" / "metrics.jsonl").read_text()
    assert metrics.count("\n") == ALTERNATIONS  # written by one rank only

    state = load_checkpoint(two / "stsb" / "bissl" / "checkpoint.pt")
    assert state["alternation"] == ALTERNATIONS and len(state["ranks"]) == 2
    assert all(torch.isfinite(t).all() for t in state["lower_params"].values())


def test_map_over_ranks_without_a_process_group_keeps_order():
    calls = []

    def fn(x):
        calls.append(x)
        return x * 10

    assert map_over_ranks(fn, [3, 1, 2]) == [30, 10, 20]
    assert map_over_ranks(fn, [4, 5], (0, 1), progress=False) == [40, 50]
    assert calls == [3, 1, 2, 4, 5]
    assert map_over_ranks(fn, []) == []
    with pytest.raises(RuntimeError, match="process group"):
        map_over_ranks(fn, [1, 2], (0, 2))
    with pytest.raises(ValueError, match="shard"):
        map_over_ranks(fn, [1, 2], (2, 2))


def _ranks_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        got = map_over_ranks(lambda x: (x, dist.get_rank()), list("abcde"), (rank, world),
                             progress=False)
        try:
            map_over_ranks(lambda x: 1 // (x - 3), range(5), (rank, world), progress=False)
            failure = "none"
        except ZeroDivisionError:
            failure = "own"
        except RankFailure as err:
            failure = str(err)
        torch.save({"got": got, "failure": failure}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_map_over_ranks_round_robin_and_errors_on_two_ranks(tmp_path):
    mp.spawn(_ranks_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    expected = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 0)]  # item i on rank i % 2
    assert results[0]["got"] == results[1]["got"] == expected
    assert results[1]["failure"] == "own"  # item 3 raised on rank 1
    assert "item 3" in results[0]["failure"] and "rank 1" in results[0]["failure"]


def test_batch_sizes_must_divide_by_the_ranks():
    cfg = RecipeConfig().bissl
    cfg.upper_batch_size, cfg.lower_batch_size = 32, 64
    assert bissl_batch_sizes(cfg, 4) == (8, 16)
    with pytest.raises(ValueError, match="bissl.upper_batch_size=32"):
        bissl_batch_sizes(cfg, 3)
    cfg.upper_batch_size = 30
    with pytest.raises(ValueError, match="bissl.lower_batch_size=64"):
        bissl_batch_sizes(cfg, 6)
    assert per_rank_batch_size(7, 1, "x") == 7


def test_streamed_corpus_chunks_are_split_by_index():
    from recipes.nlp.corpus import ChunkDataset

    def texts():
        return [" ".join(str(i) for i in range(40))]

    def tokenize(text):
        return [int(t) for t in text.split()]

    whole = [c.tolist() for c in ChunkDataset(texts, tokenize, 2, max_chunks=9)]
    shards = [ChunkDataset(texts, tokenize, 2, max_chunks=9, shard=(r, 2)) for r in range(2)]
    parts = [[c.tolist() for c in s] for s in shards]
    assert [len(s) for s in shards] == [4, 4] == [len(p) for p in parts]
    assert parts[0] == whole[0:8:2] and parts[1] == whole[1:8:2]


def test_trained_bpe_ids_are_the_same_in_every_process():
    # every rank (and a later single-process run) must map text to the same ids
    code = (
        "from recipes.nlp.synthetic import pretext_corpus\n"
        "from recipes.nlp.tokenizer import train_bpe\n"
        "print(train_bpe(pretext_corpus(600, seed=0), 200).tokenizer.to_str())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True, timeout=120).stdout
        for _ in range(2)
    }
    assert len(outputs) == 1
    from recipes.nlp.tokenizer import bpe_from_json

    encoder = bpe_from_json(outputs.pop())
    assert encoder.vocab_size == 200 and encoder("the film was great")
