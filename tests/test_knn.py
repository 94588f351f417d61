"""Weighted k-NN (DINOv2 protocol): accurate on clustered features, chance on random labels."""

import pytest
import torch
import torch.nn.functional as F

from semlab.eval.knn import knn_classify, topk_neighbours


def clustered(n_per_class, n_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_clustered_features_are_classified_well():
    xtr, ytr = clustered(50, 10, 32, noise=0.5, seed=0)
    xte, yte = clustered(20, 10, 32, noise=0.5, seed=1)
    res = knn_classify(
        xtr, ytr, xte, yte, nb_knn=[1, 10, 20], temperature=0.07, query_chunk=17, train_chunk=64
    )
    assert set(res) == {1, 10, 20}
    for k in res:
        assert res[k]["top1"] > 95.0
        assert res[k]["top5"] >= res[k]["top1"]


def test_random_labels_give_chance():
    g = torch.Generator().manual_seed(0)
    n_classes = 10
    xtr, xte = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    ytr = torch.randint(0, n_classes, (2000,), generator=g)
    yte = torch.randint(0, n_classes, (2000,), generator=g)
    res = knn_classify(xtr, ytr, xte, yte, nb_knn=[20], num_classes=n_classes)
    assert abs(res[20]["top1"] - 10.0) < 3.0  # chance 10%, std ~0.7% over 2000 queries
    assert abs(res[20]["top5"] - 50.0) < 5.0


def test_chunking_does_not_change_the_result_and_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    xte, yte = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    a = knn_classify(xtr, ytr, xte, yte, nb_knn=[5, 30], query_chunk=7, train_chunk=11)
    b = knn_classify(xtr, ytr, xte, yte, nb_knn=[5, 30], query_chunk=1000, train_chunk=100000)
    assert a == b
    # brute force: weighted vote with exp(cos / T) over the k nearest
    sim = F.normalize(xte, dim=1) @ F.normalize(xtr, dim=1).T
    s, i = sim.topk(5, dim=1)
    scores = torch.zeros(50, 4).scatter_add_(1, ytr[i], (s / 0.07).exp())
    assert a[5]["top1"] == pytest.approx(100.0 * (scores.argmax(1) == yte).float().mean().item())
    s2, i2 = topk_neighbours(F.normalize(xte, dim=1), F.normalize(xtr, dim=1), 5, train_chunk=13)
    torch.testing.assert_close(s2, s)
    assert torch.equal(i2, i)


def test_weights_favour_the_closest_neighbours():
    # one very close neighbour of class 1 outvotes two distant ones of class 0 (weights exp(sim / T))
    xtr = torch.tensor([[1.0, 0.0], [0.5, 0.8660], [0.5, -0.8660]])
    ytr = torch.tensor([1, 0, 0])
    xte, yte = torch.tensor([[1.0, 0.01]]), torch.tensor([1])
    assert knn_classify(xtr, ytr, xte, yte, nb_knn=[3], temperature=0.07)[3]["top1"] == 100.0
    assert knn_classify(xtr, ytr, xte, yte, nb_knn=[3], temperature=100.0)[3]["top1"] == 0.0


def test_bad_inputs():
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="dims"):
        knn_classify(x, y, torch.randn(2, 5), y[:2])
    with pytest.raises(ValueError, match="labels"):
        knn_classify(x, y[:3], x, y)
    with pytest.raises(ValueError, match="nb_knn"):
        knn_classify(x, y, x, y, nb_knn=[0])
