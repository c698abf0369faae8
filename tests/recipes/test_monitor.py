"""The transfer monitor: its measures against closed forms and independent computations, and the
proof that its unsupervised part never reads a downstream label."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import Dataset

from implicitbilevel.bissl import BiSSLConfig
from recipes.common.transfer_monitor import (
    MonitorData,
    alignment,
    gaussian_entropy,
    gaussian_mutual_information,
    knn_accuracy,
    rankme,
    transfer_monitor,
    uniformity,
)


def _with_singular_values(s, n=12, d=7, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sigma = np.zeros((n, d))
    sigma[: len(s), : len(s)] = np.diag(s)
    return torch.tensor(u @ sigma @ v.T)


def test_rankme_of_known_singular_values():
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert rankme(_with_singular_values(s), eps=0.0) == pytest.approx(expected, rel=1e-10)
    assert rankme(_with_singular_values([3.0] * 5), eps=0.0) == pytest.approx(5.0, rel=1e-10)
    assert rankme(_with_singular_values([1.0]), eps=0.0) == pytest.approx(1.0, abs=1e-8)
    # Garrido et al.'s ε only nudges it
    assert rankme(_with_singular_values(s)) == pytest.approx(expected, rel=1e-5)


def test_alignment_and_uniformity_of_known_point_sets():
    # two views at right angles on the unit circle: ‖ẑ1 − ẑ2‖² = 2 (any scale)
    z1, z2 = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [5.0, 0.0]])
    assert alignment(z1, z2) == pytest.approx(2.0)
    assert alignment(z1, z2, alpha=1.0) == pytest.approx(math.sqrt(2.0))
    assert alignment(z1, 7 * z1) == pytest.approx(0.0, abs=1e-12)
    # two antipodal points: −4t; the square's vertices: 4 sides (d² = 2), 2 diagonals (d² = 4)
    assert uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-8.0)
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = math.log((4 * math.exp(-4.0) + 2 * math.exp(-8.0)) / 6)
    assert uniformity(square) == pytest.approx(expected, rel=1e-12)
    assert uniformity(square, t=0.5) == pytest.approx(
        math.log((4 * math.exp(-1.0) + 2 * math.exp(-2.0)) / 6), rel=1e-12)


def test_gaussian_entropy_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    cov = np.cov(x, rowvar=False)
    expected = stats.multivariate_normal(mean=np.zeros(5), cov=cov).entropy()
    assert gaussian_entropy(torch.tensor(x), ridge=0.0) == pytest.approx(expected, rel=1e-10)


def test_gaussian_mutual_information_against_numpy_and_closed_form():
    rng = np.random.default_rng(2)
    n, rho = 20000, np.array([0.9, 0.5, 0.0])
    a = rng.standard_normal((n, 3))
    b = rho * a + np.sqrt(1 - rho**2) * rng.standard_normal((n, 3))
    mix = rng.standard_normal((3, 3))  # an invertible map of one view leaves it unchanged
    cov = np.cov(np.hstack([a, b @ mix]), rowvar=False)
    reference = 0.5 * (np.linalg.slogdet(cov[:3, :3])[1] + np.linalg.slogdet(cov[3:, 3:])[1]
                       - np.linalg.slogdet(cov)[1])
    got = gaussian_mutual_information(torch.tensor(a), torch.tensor(b @ mix), ridge=0.0)
    assert got == pytest.approx(reference, rel=1e-9)
    assert got == pytest.approx(-0.5 * np.log(1 - rho**2).sum(), abs=0.02)


def test_knn_probe_matches_sklearn():
    neighbors = pytest.importorskip("sklearn.neighbors")
    g = torch.Generator().manual_seed(3)
    centres = 2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (90,), generator=g)
    z = centres[labels] + 1.5 * torch.randn(90, 6, generator=g, dtype=torch.float64)
    memory, query = z[:60], z[60:]
    for k in (1, 4, 7):
        clf = neighbors.KNeighborsClassifier(k, metric="cosine", algorithm="brute")
        clf.fit(memory.numpy(), labels[:60].numpy())
        expected = clf.score(query.numpy(), labels[60:].numpy())
        assert knn_accuracy(memory, labels[:60], query, labels[60:], k=k) == pytest.approx(expected)
        if k != 4:
            continue
        # leave-one-out: each row against the others
        hits = []
        for i in range(60):
            rest = [j for j in range(60) if j != i]
            clf.fit(memory[rest].numpy(), labels[rest].numpy())
            hits.append(clf.predict(memory[i : i + 1].numpy())[0] == int(labels[i]))
        assert knn_accuracy(memory, labels[:60], k=k) == pytest.approx(np.mean(hits))
    with pytest.raises(ValueError, match="monitor_knn_k"):
        knn_accuracy(memory, labels[:60], k=60)


class _Item(tuple):
    """An (image, label) item whose label raises when read."""

    def __getitem__(self, i):
        if i != 0:
            raise AssertionError("the monitor read a downstream label")
        return super().__getitem__(0)

    def __iter__(self):
        raise AssertionError("the monitor read a downstream label")


class _LabelTrap(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _Item((self.images[i], None))


class _Trainer:
    config = BiSSLConfig(alternations=4)


def test_vision_monitor_reads_no_label_and_keeps_the_random_stream():
    from recipes.vision.config import DataConfig
    from recipes.vision.loaders import Loaders
    from recipes.vision.models import build_backbone

    g = torch.Generator().manual_seed(0)
    trap = _LabelTrap(torch.rand(40, 3, 8, 8, generator=g))
    cfg = DataConfig(image_size=8, test_resize=8, blur_kernel=3, workers=0)
    data = Loaders(cfg, torch.device("cpu"), None, None, trap, None, 10, False, True)
    backbone = build_backbone("small-resnet", width=4)
    monitor = MonitorData(data.monitor_views(16), backbone, modules=[backbone], limit=32)
    callback = transfer_monitor(monitor, every=2, knn_k=5)
    state = torch.get_rng_state()
    first = callback(_Trainer(), 0, {})
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's stream is untouched
    assert set(first) == {"rankme", "alignment", "uniformity", "gaussian_mi", "monitor_seconds"}
    assert all(math.isfinite(v) for v in first.values())
    assert callback(_Trainer(), 1, {}) is None and callback(_Trainer(), 3, {}) is not None
    again = callback(_Trainer(), 2, {})  # same views, same weights: same numbers
    assert {k: v for k, v in again.items() if k != "monitor_seconds"} == pytest.approx(
        {k: v for k, v in first.items() if k != "monitor_seconds"})
    assert backbone.training  # mode restored
    # the labelled probe is the only reader of labels
    with pytest.raises(AssertionError, match="read a downstream label"):
        list(data.val(16))


def test_gpt_monitor_reads_no_label():
    from recipes.nlp.model import GPTPretextModel, build_gpt
    from recipes.nlp.monitor import gpt_monitor_data
    from recipes.nlp.tasks import EncodedTask, get_task

    class Trapped(EncodedTask):
        @property
        def labels(self):
            raise AssertionError("the monitor read a downstream label")

        @labels.setter
        def labels(self, value):
            pass

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (24, 1, 12), generator=g)
    lengths = torch.randint(4, 12, (24, 1), generator=g)
    ids[torch.arange(24), 0, lengths[:, 0] - 1] = 50  # the end token (id V) is not content
    val = Trapped(ids, lengths, None, 0)
    pretext = GPTPretextModel(build_gpt(vocab_size=50, context=16, width=16, layers=1, heads=2,
                                        dropout=0.1))
    data = gpt_monitor_data(pretext, get_task("sst2"), val, torch.device("cpu"), limit=24)
    out = transfer_monitor(data, every=1, knn_k=0)(_Trainer(), 0, {})
    assert math.isfinite(out["rankme"]) and 0.0 <= out["alignment"] <= 4.0
    with pytest.raises(AssertionError, match="read a downstream label"):
        transfer_monitor(data, every=1, knn_k=3)(_Trainer(), 0, {})


def test_correlation_over_a_sweep_folder(tmp_path):
    from recipes.common.transfer_monitor import main, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 25, 90]) == pytest.approx(1.0)
    # one swap among 4 ranks: ρ = 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2], [3, 4]))
    for i, lam in enumerate(["0.001", "0.01", "0.1", "1.0"]):
        folder = tmp_path / "sweep_lam" / lam / "digits"
        folder.mkdir(parents=True)
        history = [{"alternation": t, "rankme": 2.0 + i + t, "alignment": 1.0 - 0.1 * i,
                    "uniformity": -1.0, "gaussian_mi": [3, 1, 2, 4][i] + 0.0,
                    "knn_accuracy": 0.5 + 0.1 * i + 0.01 * t} for t in (0, 5)]
        (folder / "bissl_history.json").write_text(json.dumps([{"alternation": 1}, *history]))
    result = main([str(tmp_path)])
    table = result["spearman"]
    assert table["rankme"]["knn (final)"] == pytest.approx(1.0)
    assert table["alignment"]["knn (final)"] == pytest.approx(-1.0)
    assert table["gaussian_mi"]["knn (final)"] == pytest.approx(0.4)  # ranks 3,1,2,4 vs 1..4
    assert math.isnan(table["uniformity"]["knn (final)"])
    assert (tmp_path / "monitor_correlation_lam.json").exists()
