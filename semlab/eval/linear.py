"""Linear probe with augmentation (the DINOv2 protocol), on a frozen backbone.

A grid of linear classifiers ``y = W f + b`` (W ~ N(0, 0.01^2), b = 0) is trained at once on the
same frozen features, one per combination of

    learning rate  lr  in linear.learning_rates
    n_last_blocks  n   in linear.n_last_blocks     ({1}: the reference reads the last block only)
    avgpool        p   in linear.avgpool           ({no, yes})

with ``f = concat(CLS_{D-n+1}, ..., CLS_D [, mean_patches(x_D)])``: the (normed) CLS tokens of the
last n blocks, plus the average of the last block's (normed) patch tokens when p, read with
``backbone.get_intermediate_layers(x, n_max, return_class_token=True)``.
The SEM protocol (``use_sem``) reads ``f = sem_raw(x, tau_eval)``, the raw L*V simplex output,
and grids over learning rates only.

Training: loss = sum over classifiers of CE(W f + b, y); SGD, momentum 0.9, weight decay 0, each
classifier with its own lr scaled as ``lr * batch_size * world_size / 256``; cosine schedule to 0
over ``epochs * epoch_length`` iterations. Images get RandomResizedCrop (area in
``linear.train_crop_scale``, the reference's 0.08-1 by default) + flip each step, so the
backbone (frozen, eval mode, bf16 autocast on CUDA) runs on every batch; features are not cached.
Selection (:func:`selection_protocol`): by default the reference's, which trains on the whole train
set and picks the classifier with the best top-1 on the val dataset; with ``linear.val_fraction``
> 0, on a stratified held-out part of the train set instead. The chosen classifier is reported on
the val dataset (top-1 and top-5, in percent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semlab.utils.atomic import atomic_path, atomic_write_text
from semlab.utils.distributed import default_device

logger = logging.getLogger(__name__)

RESULTS_FILE = "results_eval_linear.json"
BEST_CLASSIFIER_FILE = "best_linear_classifier.pth"
FeatureOutput = Tensor | tuple[tuple[Tensor, Tensor], ...]


# --------------------------------------------------------------------------- features
def linear_input(outputs: FeatureOutput, n_blocks: int, avgpool: bool) -> Tensor:
    """The classifier input ``f`` (B, F) in float32 from the frozen backbone's outputs.

    ``outputs``: a tensor (SEM protocol: used as is) or the ``(patch_tokens, cls_token)`` pairs of
    the last blocks (as ``get_intermediate_layers(..., return_class_token=True)`` returns them).
    """
    if isinstance(outputs, Tensor):
        return outputs.float().flatten(1)
    if n_blocks < 1 or n_blocks > len(outputs):
        raise ValueError(f"n_blocks={n_blocks} but the feature extractor returned {len(outputs)} blocks")
    last = outputs[-n_blocks:]
    feats = [cls for _, cls in last]
    if avgpool:
        feats.append(outputs[-1][0].mean(dim=1))
    return torch.cat(feats, dim=-1).float()


class FrozenFeatures(nn.Module):
    """Frozen backbone -> probe features, under ``torch.no_grad`` and (CUDA only) bf16 autocast.

    ``n_last_blocks`` > 0: the ``(patch, cls)`` pairs of that many last blocks; ``sem_temp`` set:
    ``sem_raw(x, sem_temp)`` (B, L*V).
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, sem_temp: float | None = None,
                 autocast_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks = int(n_last_blocks)
        self.sem_temp = sem_temp
        self.autocast_dtype = autocast_dtype
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenFeatures:  # the backbone always stays in eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        if x.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, x: Tensor) -> FeatureOutput:
        with self._autocast(x):
            if self.sem_temp is not None:
                return self.backbone.sem_raw(x, temp=self.sem_temp)
            return self.backbone.get_intermediate_layers(x, self.n_last_blocks, return_class_token=True)


# --------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """One point of the grid: its name, feature recipe and learning rates (base and scaled)."""

    name: str
    n_blocks: int
    avgpool: bool
    lr: float
    scaled_lr: float
    protocol: str  # "cls" | "sem"


class LinearClassifier(nn.Module):
    """``W f + b`` over ``f = linear_input(outputs, n_blocks, avgpool)``; W ~ N(0, 0.01^2), b = 0."""

    def __init__(self, in_dim: int, num_classes: int, n_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)
        self.n_blocks, self.avgpool = int(n_blocks), bool(avgpool)
        self.linear = nn.Linear(self.in_dim, self.num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, outputs: FeatureOutput) -> Tensor:
        return self.linear(linear_input(outputs, self.n_blocks, self.avgpool))


def scale_lr(lr: float, batch_size: int, world_size: int = 1) -> float:
    """DINOv2's linear-probe rule: ``lr * batch_size * world_size / 256``."""
    return float(lr) * batch_size * world_size / 256.0


def classifier_name(lr: float, n_blocks: int, avgpool: bool, protocol: str = "cls") -> str:
    """``blocks4_avgpoolYes_lr0_001`` / ``sem_lr0_001`` (no dots: they are module names)."""
    lr_str = f"{lr:g}".replace(".", "_").replace("-", "m")
    if protocol == "sem":
        return f"sem_lr{lr_str}"
    return f"blocks{n_blocks}_avgpool{'Yes' if avgpool else 'No'}_lr{lr_str}"


def grid_specs(
    learning_rates: Sequence[float],
    n_last_blocks: Sequence[int],
    avgpools: Sequence[bool],
    batch_size: int,
    world_size: int = 1,
    protocol: str = "cls",
) -> list[ClassifierSpec]:
    """Every grid point (SEM protocol: learning rates only)."""
    if not learning_rates:
        raise ValueError("linear.learning_rates is empty: give at least one learning rate")
    if protocol == "sem":
        combos = [(lr, 1, False) for lr in learning_rates]
    else:
        if not n_last_blocks or not avgpools:
            raise ValueError("linear.n_last_blocks and linear.avgpool need at least one value each")
        combos = [(lr, n, p) for n in n_last_blocks for p in avgpools for lr in learning_rates]
    return [
        ClassifierSpec(classifier_name(lr, int(n), bool(p), protocol), int(n), bool(p), float(lr),
                       scale_lr(lr, batch_size, world_size), protocol)
        for lr, n, p in combos
    ]


class LinearGrid(nn.Module):
    """All classifiers of the grid; ``forward(outputs)`` -> ``{name: logits}``."""

    def __init__(
        self, specs: Sequence[ClassifierSpec], sample_outputs: FeatureOutput, num_classes: int
    ) -> None:
        super().__init__()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate classifier names in the grid: {names} (repeated learning rates?)")
        self.specs = {s.name: s for s in specs}
        self.classifiers = nn.ModuleDict({
            s.name: LinearClassifier(linear_input(sample_outputs, s.n_blocks, s.avgpool).shape[-1],
                                     num_classes, s.n_blocks, s.avgpool)
            for s in specs
        })

    def forward(self, outputs: FeatureOutput) -> dict[str, Tensor]:
        return {name: clf(outputs) for name, clf in self.classifiers.items()}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.classifiers[n].parameters()), "lr": s.scaled_lr, "name": n}
                for n, s in self.specs.items()]


# --------------------------------------------------------------------------- training / evaluation
def train_grid(
    grid: LinearGrid,
    features: Callable[[Tensor], FeatureOutput],
    batches: Iterator[tuple[Tensor, Tensor]],
    max_iter: int,
    device: torch.device,
    progress: bool = False,
    log_every: int = 50,
) -> dict[str, float]:
    """Train every classifier for ``max_iter`` steps (SGD momentum 0.9, wd 0, cosine lr to 0).

    Returns throughput and the last logged losses: ``{"images_per_s", "seconds", "loss_mean",
    "loss_min"}`` (mean over the grid, and of its lowest classifier: a too-large lr in the grid
    inflates the mean while the classifiers worth choosing still converge).
    """
    if max_iter < 1:
        raise ValueError(
            f"the probe needs at least one iteration (linear.epochs * linear.epoch_length), got {max_iter}"
        )
    optimizer = torch.optim.SGD(grid.param_groups(), momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_iter, eta_min=0.0)
    grid.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc="linear probe", unit="it", dynamic_ncols=True)
    images, start, loss_mean, loss_min = 0, time.perf_counter(), float("nan"), float("nan")
    for it in range(max_iter):
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        outputs = features(x)
        logits = grid(outputs)
        losses = [F.cross_entropy(out, y) for out in logits.values()]
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        images += x.shape[0]
        if it % log_every == 0 or it == max_iter - 1:
            loss_mean = float(loss.detach()) / len(losses)
            loss_min = float(torch.stack(losses).detach().min())
            rate = images / max(time.perf_counter() - start, 1e-9)
            if bar is not None:
                bar.set_postfix(loss_min=f"{loss_min:.3f}", loss_mean=f"{loss_mean:.3f}", img_s=f"{rate:.1f}")
            else:
                logger.info("linear probe it %d/%d loss min %.4f mean %.4f %.1f images/s", it, max_iter,
                            loss_min, loss_mean, rate)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    return {"images_per_s": images / max(seconds, 1e-9), "seconds": seconds, "loss_mean": loss_mean,
            "loss_min": loss_min}


@torch.no_grad()
def evaluate_grid(
    grid: LinearGrid,
    features: Callable[[Tensor], FeatureOutput],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 accuracy (percent; top-5 over min(5, C) classes) of every classifier."""
    grid.eval()
    correct = {name: [0, 0] for name in grid.specs}
    n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        logits = grid(features(x))
        for name, out in logits.items():
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            hit = top == y.unsqueeze(1)
            correct[name][0] += int(hit[:, 0].sum())
            correct[name][1] += int(hit.any(dim=1).sum())
        n += y.shape[0]
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {
        name: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "n": n} for name, (c1, c5) in correct.items()
    }


def best_of(accuracies: dict[str, dict[str, float]]) -> str:
    """Name of the classifier with the highest top-1 (ties: the first in grid order)."""
    return max(accuracies, key=lambda name: accuracies[name]["top1"])


# --------------------------------------------------------------------------- the whole protocol
def usable_block_counts(requested: Sequence[int], backbone: nn.Module) -> list[int]:
    """``linear.n_last_blocks`` values the backbone can serve; larger ones are dropped with a warning.

    A 2-block demo model cannot give the concatenated CLS tokens of its last 4 blocks; the probe
    grid then uses the counts that exist instead of failing after the features are built.
    """
    depth = len(list(backbone.iter_blocks())) if hasattr(backbone, "iter_blocks") else None
    counts = sorted({int(n) for n in requested})
    if any(n < 1 for n in counts):
        raise ValueError(f"linear.n_last_blocks must be positive block counts, got {counts}")
    if depth is None:
        return counts
    usable = [n for n in counts if n <= depth] or [depth]
    if usable != counts:
        logger.warning("linear.n_last_blocks %s: the backbone has %d blocks, probing with %s", counts, depth,
                       usable)
    return usable


def selection_protocol(val_fraction: float) -> str:
    """How the best classifier is chosen, in words that every result file and MLflow record carries.

    ``val_fraction`` 0 is the reference's protocol (DINOv2 and the seed: train on the whole train
    set, pick the best classifier on the val set and report it there); > 0 is semlab's option of
    picking on a stratified held-out fraction of train, so that the val figure is not selected on.
    """
    if val_fraction == 0.0:
        return "reference: trained on all of train, best classifier picked on val"
    kept, held = f"{1 - val_fraction:.0%}", f"{val_fraction:.0%}"
    return f"holdout: trained on {kept} of train, best classifier picked on a {held} train holdout"


def run_linear_probe(
    backbone: nn.Module,
    cfg: Any,
    train_dataset: str,
    val_dataset: str,
    output_dir: str | Path,
    use_sem: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    world_size: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the probe of ``cfg.linear`` on ``backbone``; write ``results_eval_linear.json`` and the best
    classifier (``best_linear_classifier.pth``) in ``output_dir`` (atomically); return the results."""
    from semlab.eval.probe_data import make_probe_data

    lin = cfg.linear
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    protocol = "sem" if use_sem else "cls"
    if use_sem and not getattr(backbone, "has_sem", False):
        raise ValueError("--use-sem needs a SEM backbone (student.L > 0 and student.V); this one has no SEM")
    backbone = backbone.to(device)
    n_last_blocks = usable_block_counts(list(lin.n_last_blocks), backbone)
    n_max = max(n_last_blocks) if not use_sem else 1
    features = FrozenFeatures(backbone, n_max, sem_temp=float(cfg.evaluation.sem_temp) if use_sem else None)
    data = make_probe_data(
        train_dataset, val_dataset, int(lin.batch_size), int(lin.num_workers), int(lin.resize_size),
        int(lin.crop_size), float(lin.val_fraction), seed, tuple(lin.train_crop_scale),
    )
    specs = grid_specs(list(lin.learning_rates), n_last_blocks, list(lin.avgpool),
                       int(lin.batch_size), world_size, protocol)
    train_iter = iter(data.train)
    x0, _ = next(train_iter)
    sample = features(x0.to(device))
    grid = LinearGrid(specs, sample, data.num_classes).to(device)
    max_iter = int(lin.epochs) * int(lin.epoch_length)
    logger.info("linear probe (%s): %d classifiers, %d iterations of %d images, %s", protocol, len(specs),
                max_iter, int(lin.batch_size), data.sizes)
    stats = train_grid(grid, features, train_iter, max_iter, device, progress=progress)
    val_all = evaluate_grid(grid, features, data.val, device)
    if data.holdout is not None:
        selection, held = "holdout", evaluate_grid(grid, features, data.holdout, device)
    else:
        selection, held = "val", val_all
    best = best_of(held)
    results = {
        "protocol": protocol,
        "best_classifier": best,
        "selection": selection,
        "selection_protocol": selection_protocol(float(lin.val_fraction)),
        "val_top1": val_all[best]["top1"],
        "val_top5": val_all[best]["top5"],
        "holdout_top1": held[best]["top1"],
        "classifiers": {
            name: {"lr": s.lr, "scaled_lr": s.scaled_lr, "n_last_blocks": s.n_blocks, "avgpool": s.avgpool,
                   "holdout_top1": held[name]["top1"], "holdout_top5": held[name]["top5"],
                   "val_top1": val_all[name]["top1"], "val_top5": val_all[name]["top5"]}
            for name, s in grid.specs.items()
        },
        "num_classes": data.num_classes,
        "sizes": data.sizes,
        "iterations": max_iter,
        "batch_size": int(lin.batch_size),
        "world_size": world_size,
        "sem_temp": float(cfg.evaluation.sem_temp) if use_sem else None,
        "images_per_s": stats["images_per_s"],
        "train_seconds": stats["seconds"],
        "final_loss_min": stats["loss_min"],
        "final_loss_mean": stats["loss_mean"],
        "train_crop_scale": [float(v) for v in lin.train_crop_scale],
        "device": str(device),
    }
    save_results(results, grid, best, output_dir)
    logger.info("linear probe (%s): best %s, val top-1 %.2f%% top-5 %.2f%%", protocol, best,
                results["val_top1"], results["val_top5"])
    return results


def resolve_recipe(name: str) -> str:
    """A recipe path; also accepts the seed's spelling ``dinov2/configs/eval/vitl14_L512.yaml``."""
    from semlab.config import ConfigError, recipe_path

    try:
        return str(recipe_path(name))
    except ConfigError:
        path = Path(name)
        if path.parent.name in ("eval", "train"):
            return str(recipe_path(f"{path.parent.name}/{path.stem}"))
        raise


def build_eval_backbone(cfg: Any, pretrained_weights: str | Path | None) -> nn.Module:
    """The teacher backbone of ``cfg.student`` with ``pretrained_weights`` loaded (teacher part of a
    ``teacher_checkpoint.pth``, a full training checkpoint, or a released backbone), in eval mode.

    SEM models get ``evaluation.sem_temp`` as their default temperature.
    """
    from semlab.models import build_model_from_cfg, load_weights

    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    if pretrained_weights:
        path = Path(pretrained_weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"--pretrained-weights {path} does not exist; pass a teacher checkpoint such as "
                f"<output_dir>/eval/training_<it>/teacher_checkpoint.pth"
            )
        load_weights(backbone, path, which="teacher")
    else:
        logger.warning("no pretrained weights given: evaluating a randomly initialised backbone")
    if getattr(backbone, "has_sem", False):
        backbone.set_sem_temp(float(cfg.evaluation.sem_temp))
    return backbone.eval()


def save_results(results: dict[str, Any], grid: LinearGrid, best: str, output_dir: str | Path) -> None:
    """``results_eval_linear.json`` and the best classifier's weights, both written atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf = grid.classifiers[best]
    spec = grid.specs[best]
    state = {
        "name": best,
        "protocol": spec.protocol,
        "lr": spec.lr,
        "n_last_blocks": spec.n_blocks,
        "avgpool": spec.avgpool,
        "in_dim": clf.in_dim,
        "num_classes": clf.num_classes,
        "sem_temp": results.get("sem_temp"),
        "state_dict": {k: v.detach().cpu() for k, v in clf.state_dict().items()},
    }
    with atomic_path(out / BEST_CLASSIFIER_FILE) as tmp:
        torch.save(state, tmp)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, allow_nan=True) + "\n")


def load_linear_classifier(path: str | Path) -> tuple[LinearClassifier, dict[str, Any]]:
    """Rebuild the classifier saved by :func:`save_results` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    clf = LinearClassifier(state["in_dim"], state["num_classes"], state["n_last_blocks"], state["avgpool"])
    clf.load_state_dict(state["state_dict"])
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    return clf, meta
