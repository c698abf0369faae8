"""Real-data paths on small fixtures: GLUE TSV and saved datasets, corpora, offline guards."""

import datasets
import pytest
import torch

from recipes.nlp.corpus import ChunkDataset, chunk_tokens, text_source
from recipes.nlp.glue import load_glue_task, train_validation_split
from recipes.nlp.hub import MissingResourceError, check_vocab, resolve_pretrained
from recipes.nlp.synthetic import pretext_corpus, synthetic_task
from recipes.nlp.tasks import get_task
from recipes.nlp.tokenizer import train_bpe


def test_glue_tsv_layout(tmp_path):
    (tmp_path / "RTE").mkdir()
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tpremise {i}\thypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}"
        for i in range(10)
    ]
    (tmp_path / "RTE" / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "RTE" / "dev.tsv").write_text("\n".join(rows[:4]) + "\n")
    (tmp_path / "CoLA").mkdir()
    cola = [f"src\t{i % 2}\t*\tsentence {i}" for i in range(5)]
    (tmp_path / "CoLA" / "train.tsv").write_text("\n".join(cola) + "\n")
    (tmp_path / "CoLA" / "dev.tsv").write_text("\n".join(cola) + "\n")
    train, test = load_glue_task(get_task("rte"), str(tmp_path))
    assert len(train) == 10 and len(test) == 3
    assert train.texts_a[1] == "premise 1" and train.texts_b[1] == "hypothesis 1"
    assert train.labels[:2] == [1, 0]  # datasets' convention: entailment = 0
    first, rest = train_validation_split(train, 0.8)
    assert first.texts_a == [f"premise {i}" for i in range(8)] and len(rest) == 2
    cola_train, _ = load_glue_task(get_task("cola"), str(tmp_path))
    assert cola_train.labels == [0, 1, 0, 1, 0] and cola_train.texts_b is None


def test_glue_saved_dataset(tmp_path):
    split = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"],
                                        "label": [1.5, 4.0], "idx": [0, 1]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "stsb")
    train, test = load_glue_task(get_task("stsb"), str(tmp_path))
    assert train.labels == [1.5, 4.0] and test.texts_b == ["c", "d"]


def test_missing_glue_names_what_to_provide(tmp_path):
    with pytest.raises(MissingResourceError, match="QNLI/train.tsv"):
        load_glue_task(get_task("qnli"), str(tmp_path))


def test_offline_guards(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResourceError, match="unreachable"):
        resolve_pretrained("openai-community/openai-gpt", "model")
    with pytest.raises(MissingResourceError, match="unreachable"):
        load_glue_task(get_task("sst2"), "hub")
    with pytest.raises(MissingResourceError, match="unreachable"):
        text_source("hub:bookcorpus")
    assert resolve_pretrained(str(tmp_path), "model") == str(tmp_path)
    with pytest.raises(MissingResourceError, match="vocabulary of 1"):
        check_vocab(1, None, "openai-community/openai-gpt")
    with pytest.raises(MissingResourceError, match="40478"):
        check_vocab(500, 40478, "dir")


def test_corpus_chunks_and_text_files(tmp_path):
    chunks = chunk_tokens(["1 2 3", "4 5", "6 7 8 9 10"], lambda t: [int(x) for x in t.split()], 3)
    assert [c.tolist() for c in chunks] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # tail dropped
    (tmp_path / "book.txt").write_text("one two three four five six seven")
    texts = text_source(str(tmp_path))
    encoder = train_bpe(pretext_corpus(200, 0), 100)
    dataset = ChunkDataset(texts, encoder, 4, max_chunks=1)
    chunks = list(dataset)
    assert len(dataset) == 1 and len(chunks) == 1 and chunks[0].shape == (4,)
    assert chunks[0].dtype == torch.long
    with pytest.raises(MissingResourceError, match="not found"):
        text_source(str(tmp_path / "missing"))


def test_synthetic_tasks_are_deterministic_and_balanced():
    a, _ = synthetic_task("mrpc", 200, 10, seed=0)
    b, _ = synthetic_task("mrpc", 200, 10, seed=0)
    assert a.texts_a == b.texts_a and a.labels == b.labels
    assert 0.3 < sum(a.labels) / len(a.labels) < 0.7
    s, _ = synthetic_task("stsb", 100, 10, seed=0)
    assert all(0.0 <= y <= 5.0 for y in s.labels)


def test_rte_negation_words_do_not_decide_the_label():
    """RTE's hypotheses carry negation words under both labels (contradicting negations and
    entailed ones such as "no one but anna bought the car ."), so a model must read their scope;
    the template pools are what the generator documents."""
    from recipes.nlp import synthetic

    train, _ = synthetic_task("rte", 2000, 10, seed=0, label_noise=0.0)
    negation = ("nobody", "no one", "never", "did not", "none of", "hardly", "nothing")

    def share(label: int) -> float:
        hyps = [h for h, y in zip(train.texts_b, train.labels) if y == label]
        return sum(any(w in h for w in negation) for h in hyps) / len(hyps)

    entailed, contradicted = share(0), share(1)
    # entailed pairs: 30% of them use an entailed negation form; contradictions: the easy share
    assert 0.25 < entailed < 0.35, entailed
    easy = synthetic.EASY_FRACTIONS["rte"]
    assert easy - 0.06 < contradicted < easy + 0.06, contradicted
    assert abs(sum(y == 0 for y in train.labels) / len(train.labels) - 0.5) < 0.04
    marks = ("no one but", "did not fail", "nothing but")
    entailed_forms = [h for h, y in zip(train.texts_b, train.labels)
                      if y == 0 and any(m in h for m in marks)]
    assert entailed_forms and all(
        h.split()[-2] in synthetic.OBJECTS for h in entailed_forms), entailed_forms[:3]
