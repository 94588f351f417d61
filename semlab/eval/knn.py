"""Weighted k-NN classification of frozen features (the DINO / DINOv2 protocol).

Features are L2-normalised; for a query q the similarity to each training feature x_i is the
cosine ``s_i = <q, x_i>``. Among the k most similar training points N_k(q), class c scores

    score_c(q) = sum_{i in N_k(q)} exp(s_i / T) * [y_i = c]          (T = 0.07)

and the prediction is the arg-max (top-5: the 5 best classes). Accuracies are percentages.
Queries are processed in chunks of ``query_chunk`` rows and the training set in chunks of
``train_chunk`` rows with a running top-k merge, so memory is O(query_chunk * (train_chunk + k))
whatever the dataset sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(features: Tensor, labels: Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} labels must be (N,) with N={features.shape[0]} matching the features, "
            f"got shape {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name} set is empty")


@torch.no_grad()
def topk_neighbours(
    queries: Tensor, train: Tensor, k: int, train_chunk: int = 65536
) -> tuple[Tensor, Tensor]:
    """(similarities, indices), each (Q, k) sorted descending: the k most similar rows of ``train``."""
    best_sim = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], train_chunk):
        block = train[start : start + train_chunk]
        sim = queries @ block.T
        kk = min(k, sim.shape[1])
        s, i = sim.topk(kk, dim=1)
        best_sim = torch.cat((best_sim, s), dim=1)
        best_idx = torch.cat((best_idx, i + start), dim=1)
        if best_sim.shape[1] > k:
            best_sim, order = best_sim.topk(k, dim=1)
            best_idx = best_idx.gather(1, order)
    order = best_sim.argsort(dim=1, descending=True)
    return best_sim.gather(1, order), best_idx.gather(1, order)


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    nb_knn: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    query_chunk: int = 256,
    train_chunk: int = 65536,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy for each k: ``{k: {"top1": %, "top5": %}}`` (see module doc).

    A k larger than the training set uses all training points. ``top5`` uses min(5, C) classes.
    """
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have {train_features.shape[1]} dims but test features "
            f"{test_features.shape[1]}; extract both with the same model and feature kind"
        )
    if not nb_knn or min(nb_knn) < 1:
        raise ValueError(f"nb_knn must be a non-empty list of k >= 1, got {list(nb_knn)}")
    if not temperature > 0:
        raise ValueError(f"k-NN temperature must be > 0, got {temperature}")
    device = torch.device(device) if device is not None else train_features.device
    train = F.normalize(train_features.to(device).float(), dim=1)
    test = F.normalize(test_features.to(device).float(), dim=1)
    train_y = train_labels.to(device).long()
    test_y = test_labels.to(device).long()
    if num_classes is None:
        num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    n_top5 = min(5, num_classes)
    ks = sorted({int(k) for k in nb_knn})
    k_max = min(max(ks), train.shape[0])
    correct = {k: [0, 0] for k in ks}

    for start in range(0, test.shape[0], query_chunk):
        q = test[start : start + query_chunk]
        y = test_y[start : start + query_chunk]
        sims, idx = topk_neighbours(q, train, k_max, train_chunk)
        weights = (sims / temperature).exp()  # (Q, k_max)
        neighbour_y = train_y[idx]
        for k in ks:
            kk = min(k, k_max)
            scores = weights.new_zeros(q.shape[0], num_classes)
            scores.scatter_add_(1, neighbour_y[:, :kk], weights[:, :kk])
            pred = scores.topk(n_top5, dim=1).indices
            hit = pred == y.unsqueeze(1)
            correct[k][0] += int(hit[:, 0].sum())
            correct[k][1] += int(hit.any(dim=1).sum())
    n = test.shape[0]
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()}
