"""Hostile data files are refused by name, never read into a silently wrong run: text that is not
UTF-8, a byte-order mark, TSV rows with a missing or an extra field, a downstream split left
empty, a task list naming one task twice. Every fixture is written here."""

import pytest
import torch

from recipes.nlp.glue import TSV_DIRS, load_glue_task
from recipes.nlp.tasks import TASKS


def _glue(root, task, train: bytes, dev: bytes | None = None):
    folder = root / TSV_DIRS[task]
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes(train)
    (folder / "dev.tsv").write_bytes(train if dev is None else dev)
    return str(root)


# -- text is UTF-8: a file that is not is named with its line; a byte-order mark is dropped ------


@pytest.mark.parametrize("task", ["sst2", "cola"])
def test_a_latin1_glue_tsv_is_refused_naming_file_and_line(tmp_path, task):
    rows = {"sst2": "sentence\tlabel\ngood\t1\ncafé au lait\t0\n",
            "cola": "src\t1\t\tgood\nsrc\t0\t*\tcafé au lait\n"}[task]
    line = 3 if task == "sst2" else 2
    root = _glue(tmp_path, task, rows.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"train\.tsv:{line}: not UTF-8 text \(byte 0xe9"):
        load_glue_task(TASKS[task], root)


def test_a_utf8_bom_is_not_part_of_the_first_column_name(tmp_path):
    bom = "\ufeff".encode()
    root = _glue(tmp_path, "sst2", bom + b"sentence\tlabel\r\ngood\t1\r\nbad\t0\r\n",
                 bom + b"sentence\tlabel\nfine\t1\n")
    train, test = load_glue_task(TASKS["sst2"], root)
    assert train.texts_a == ["good", "bad"] and train.labels == [1, 0]
    assert test.texts_a == ["fine"] and test.labels == [1]
    cola = _glue(tmp_path / "c", "cola", bom + b"src\t1\t\tok\n")
    assert load_glue_task(TASKS["cola"], cola)[0].texts_a == ["ok"]


def test_corpus_text_files_are_utf8_named_when_not(tmp_path):
    from recipes.nlp.corpus import text_source

    (tmp_path / "good.txt").write_bytes("\ufeffFirst para.\r\n\r\nSecond para.".encode())
    assert list(text_source(str(tmp_path / "good.txt"))()) == ["First para.", "Second para."]
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_bytes("\ufeffOne book.".encode())
    (tmp_path / "books" / "b.txt").write_bytes("line one\nline two\ncafé\n".encode("latin-1"))
    texts = iter(text_source(str(tmp_path / "books"))())
    assert next(texts) == "One book."
    with pytest.raises(ValueError, match=r"books/b\.txt:3: not UTF-8 text \(byte 0xe9"):
        next(texts)
    with pytest.raises(ValueError, match=r"b\.txt:3: not UTF-8 text"):
        list(text_source(str(tmp_path / "books" / "b.txt"))())


# -- a TSV row with a missing (or an extra) field is refused, not dropped ------------------------


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("sst2", "sentence\tlabel\ngood\t1\nbad\n",
         r"train\.tsv:3: 1 tab-separated fields, expected 2 .*a field is missing"),
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
         r"train\.tsv:3: 3 tab-separated fields, expected 4 .*a field is missing"),
        ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\ta?\n",
         r"train\.tsv:2: 4 tab-separated fields, expected 6 .*a field is missing"),
        ("cola", "src\t1\t\tgood\nsrc\t0\t*\n",
         r"train\.tsv:2: 3 tab-separated fields, expected 4 .*a field is missing"),
        ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tone\thalf\tother\n",
         r"train\.tsv:2: 6 tab-separated fields, expected 5 .*extra fields \(a tab"),
    ],
    ids=["sst2-no-label", "rte-no-label", "qqp-broken", "cola-no-sentence", "mrpc-extra-tab"],
)
def test_a_row_with_a_missing_field_is_refused_naming_file_and_line(tmp_path, task, text, match):
    root = _glue(tmp_path, task, text.encode())
    with pytest.raises(ValueError, match=match):
        load_glue_task(TASKS[task], root)


def test_blank_lines_and_empty_texts_still_load(tmp_path):
    root = _glue(tmp_path, "rte", b"index\tsentence1\tsentence2\tlabel\n0\ta\t\tentailment\n\n")
    train, _ = load_glue_task(TASKS["rte"], root)
    assert train.texts_a == ["a"] and train.texts_b == [""] and train.labels == [0]


# -- a downstream split left empty is refused naming the split and the counts --------------------


def test_an_image_folder_too_small_to_split_is_refused(tmp_path):
    from PIL import Image

    from recipes.vision.config import DataConfig
    from recipes.vision.loaders import build_loaders

    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (90 * c, 7, 7)).save(tmp_path / split / name / "0.png")
    cfg = DataConfig(pretext="imagefolder", pretext_root=str(tmp_path / "train"),
                     downstream="imagefolder", downstream_root=str(tmp_path),
                     image_size=8, test_resize=8, workers=0)
    with pytest.raises(ValueError, match=r"the val split holds no image \(train 2, val 0, test 2; "
                                         r"train and val split 80/20 from the 2 images of .*train "
                                         r"\(no val/ folder\)\).*or a val/ folder"):
        build_loaders(cfg, torch.device("cpu"))
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "train" / "cat" / "1.png")
    loaders = build_loaders(cfg, torch.device("cpu"))  # 3 images: 2 train, 1 val
    assert (len(loaders.train_set), len(loaders.val_set), len(loaders.test_set)) == (2, 1, 2)


def test_split_sizes_are_checked_for_every_split():
    from torch.utils.data import TensorDataset

    from recipes.vision.data import DownstreamData, check_split_sizes

    def images(n):
        return TensorDataset(torch.zeros(n, 3, 2, 2))

    check_split_sizes(DownstreamData(images(2), images(1), images(1), 2), "dtd", "/data")
    with pytest.raises(ValueError, match=r"dtd under '/data': the test split holds no image "
                                         r"\(train 2, val 1, test 0\)"):
        check_split_sizes(DownstreamData(images(2), images(1), images(0), 2), "dtd", "/data")


# -- a task list naming one task twice (or none) is refused -----------------------------------


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        (["rte", "RTE"], r"data\.tasks names GLUE task 'rte' twice \('rte' and 'RTE'\)"),
        (["sst2", "SST-2"], r"data\.tasks names GLUE task 'sst2' twice \('sst2' and 'SST-2'\)"),
        (["cola", "cola"], r"data\.tasks names GLUE task 'cola' twice"),
    ],
)
def test_a_task_named_twice_is_refused_before_loading(tasks, match):
    from recipes.nlp.config import DataConfig
    from recipes.nlp.data import load_task
    from recipes.nlp.synthetic import pretext_corpus
    from recipes.nlp.tokenizer import train_bpe

    data = DataConfig(tasks=tasks, glue="embedded", embedded_train=20, embedded_test=10)
    with pytest.raises(ValueError, match=match):
        load_task(tasks[0], data, train_bpe(pretext_corpus(200, 0), 100), 64)


def test_resolve_tasks_keeps_order_and_refuses_an_empty_list():
    from recipes.nlp.tasks import resolve_tasks

    assert [s.name for s in resolve_tasks(["STS-B", "cola"])] == ["stsb", "cola"]
    with pytest.raises(ValueError, match=r"data\.tasks is empty"):
        resolve_tasks([])
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        resolve_tasks(["mnli"])
