"""One pretraining, start to end: setup -> model -> data -> loop -> final evaluation.

``run_pretraining`` is the only path that trains: the single-process run of
``experiments/pretrain.py --local`` calls it, and so does every Ray Train worker
(``semlab.orchestration.worker``), which only adds what is Ray's (restore, the dataset shard,
reporting to Ray). Rank and world size come from the default process group (none: rank 0 of 1).

1. setup: ``<output_dir>``, ``train.output_dir``, the sqrt learning-rate rule for the global
   batch, ``config.yaml`` (rank 0), ``train.num_threads``, seeds ``train.seed + rank``;
2. model: ``SSLMetaArch`` made data parallel by :func:`semlab.train.parallel.parallelize`;
3. data: ``data(start_iter)`` (default: the local torch loader, this rank's part);
4. loop: :func:`semlab.train.loop.do_train`;
5. final evaluation: ``evaluate(teacher_backbone, iteration) -> metrics`` on rank 0 (the teacher's
   full state is gathered first when it is sharded), logged with ``reporter.log_evaluation``.

``evaluate_during_training(teacher_backbone, iteration) -> metrics`` (optional) runs the same way
at every ``evaluation.eval_period_iterations`` inside the loop; its metrics reach
``reporter.on_training_evaluation`` (Ray and MLflow) at that iteration.

The evaluations are hooks so that ``train`` does not import ``eval``: callers pass
``semlab.eval.knn_report.FinalKnn`` and ``semlab.eval.training_knn.TrainingKnn``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from semlab.config import apply_scaling_rules, save_config
from semlab.train.loop import do_train
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.parallel import is_sharded, parallelize
from semlab.train.reporting import Reporter
from semlab.utils import distributed

DataFactory = Callable[[int], Iterator[dict[str, Any]]]
Evaluation = Callable[[nn.Module, int], dict[str, float]]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run(cfg: DictConfig, output_dir: Path) -> None:
    """Output dir, ``train.output_dir``, lr scaling for the global batch, ``config.yaml`` (rank 0),
    ``train.num_threads`` (else torch's default, e.g. Ray's OMP_NUM_THREADS), seeds."""
    from semlab.config.checks import check_training_config

    check_training_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.output_dir = str(output_dir)
    apply_scaling_rules(cfg, distributed.get_world_size())
    if distributed.is_main_process():
        save_config(cfg, output_dir / "config.yaml")
    if int(cfg.train.num_threads) > 0:
        torch.set_num_threads(int(cfg.train.num_threads))
    seed_everything(int(cfg.train.seed) + distributed.get_rank())


def local_data(cfg: DictConfig) -> DataFactory:
    """``start_iter -> iterator`` of this rank's batches from the torch DataLoader (no Ray)."""
    from semlab.data.pipeline.loaders import make_local_data_iterator

    def factory(start_iter: int) -> Iterator[dict[str, Any]]:
        return make_local_data_iterator(
            cfg, rank=distributed.get_rank(), world_size=distributed.get_world_size(), start_iter=start_iter
        )

    return factory


def final_teacher_backbone(model: SSLMetaArch, cfg: DictConfig) -> nn.Module | None:
    """The teacher backbone as a plain module on rank 0 (None elsewhere). A sharded teacher is
    gathered (collective: every rank calls this) into a fresh backbone on the same device."""
    if not is_sharded(model.teacher):
        return model.teacher.backbone if distributed.is_main_process() else None
    from semlab.models import build_model_from_cfg
    from semlab.train.checkpointing import teacher_state_dict

    state = teacher_state_dict(model)
    if not distributed.is_main_process():
        return None
    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    device = next(model.teacher.parameters()).device
    return backbone.to(device).eval()


def run_pretraining(
    cfg: DictConfig,
    output_dir: str | Path,
    resume: bool = True,
    reporter: Reporter | None = None,
    *,
    data: DataFactory | None = None,
    evaluate: Evaluation | None = None,
    device: torch.device | str | None = None,
    resume_from: str | Path | None = None,
    evaluate_during_training: Evaluation | None = None,
) -> dict[str, Any]:
    """Run the whole pretraining (see the module doc) and return ``do_train``'s summary, with
    ``final_metrics`` (the evaluation's, on rank 0) when ``evaluate`` is given. ``resume_from``: a
    checkpoint folder to resume from (see ``do_train``)."""
    output_dir = Path(output_dir)
    reporter = reporter if reporter is not None else Reporter()
    prepare_run(cfg, output_dir)
    model = SSLMetaArch(cfg)
    parallelize(model, cfg, device if device is not None else distributed.default_device())
    data = data if data is not None else local_data(cfg)
    periodic = None
    if evaluate_during_training is not None:

        def periodic(trained: nn.Module, iteration: int) -> dict[str, float]:
            backbone = final_teacher_backbone(trained, cfg)  # collective when the teacher is sharded
            return evaluate_during_training(backbone, iteration) if backbone is not None else {}

    summary = do_train(
        cfg, model, data, output_dir, reporter=reporter, resume=resume, resume_from=resume_from,
        evaluate=periodic,
    )
    if evaluate is not None:
        backbone = final_teacher_backbone(model, cfg)
        if backbone is not None:
            metrics = evaluate(backbone, int(summary["iteration"]))
            if metrics:
                reporter.log_evaluation("knn", metrics, step=int(summary["iteration"]))
            summary["final_metrics"] = metrics
    return summary
