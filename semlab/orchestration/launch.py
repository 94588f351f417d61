"""Command line of a pretraining: ``experiments/pretrain.py`` calls :func:`main`.

::

    python experiments/pretrain.py [--config-file R] [--output-dir D] [--no-resume]
                                   [--nodes N --ngpus G] [--num-workers W] [--use-gpu] [--local]
                                   [key=value ...]

- By default the run goes through Ray Train (``ray.address=auto``): under ``ray job submit`` it
  uses the job's cluster, on a machine where ``ray start`` ran it joins that cluster, and
  otherwise it starts a private local cluster for the run (see :mod:`semlab.orchestration.cluster`).
- ``--local`` (or ``ray.address=none``) trains in this process without Ray (the plain path).
- ``--nodes N --ngpus G`` (the seed's flags) ask for ``N * G`` Ray workers with one GPU each;
  ``--nodes`` alone multiplies ``ray.num_workers`` (workers per node). ``--num-workers`` and
  ``--use-gpu/--no-use-gpu`` override ``ray.num_workers`` / ``ray.use_gpu`` directly.
- ``--no-resume`` starts over: a fresh Ray run name and no resume from ``--output-dir``; by default
  a rerun with the same output dir / ``ray.run_name`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "train/demo_tiny"
DEFAULT_OUTPUT = "outputs/demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file", default=DEFAULT_CONFIG, help="recipe name (train/vitl14_sem_L512) or YAML path"
    )
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="checkpoints, eval checkpoints, metrics")
    p.add_argument(
        "--no-resume", action="store_true", help="start over instead of resuming the last checkpoint"
    )
    p.add_argument("--nodes", type=int, default=None, help="nodes (Ray workers = nodes x ngpus)")
    p.add_argument("--ngpus", type=int, default=None, help="GPUs per node (one Ray worker per GPU)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (ray.num_workers)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="ray.use_gpu")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. student.L=512")
    return p


def ray_overrides(args: argparse.Namespace, cfg: DictConfig) -> list[str]:
    """Dotlist overrides of the ``ray:`` section implied by the worker flags (see the module doc)."""
    out: list[str] = []
    for flag in ("nodes", "ngpus", "num_workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.ngpus is not None:
        out += [f"ray.num_workers={(args.nodes or 1) * args.ngpus}", "ray.use_gpu=true"]
    elif args.nodes is not None:
        out.append(f"ray.num_workers={args.nodes * int(cfg.ray.num_workers)}")
    if args.num_workers is not None:
        out.append(f"ray.num_workers={args.num_workers}")
    if args.use_gpu is not None:
        out.append(f"ray.use_gpu={'true' if args.use_gpu else 'false'}")
    return out


def load_run_config(args: argparse.Namespace) -> DictConfig:
    """Defaults <- recipe <- overrides <- worker flags, checked as a pretraining needs them
    (``check_training_config``) before anything starts."""
    from semlab.config import load_config
    from semlab.config.checks import check_training_config

    cfg = load_config(args.config_file, list(args.overrides))
    extra = ray_overrides(args, cfg)
    cfg = load_config(args.config_file, [*args.overrides, *extra]) if extra else cfg
    check_training_config(cfg)
    return cfg


def _print_summary(output_dir: Path, iteration: int | None, seconds: float) -> None:
    from semlab.eval.knn_report import KNN_RESULTS, format_knn_lines

    where = f"trained to iteration {iteration}" if iteration is not None else "training finished"
    print(f"{where} in {seconds:.0f} s; outputs in {output_dir}")
    knn_file = output_dir / KNN_RESULTS
    if knn_file.is_file():
        for line in format_knn_lines(json.loads(knn_file.read_text())):
            print(line)


def run_local(cfg: DictConfig, output_dir: Path, resume: bool, recipe: str | None) -> dict[str, Any]:
    """The single-process path (no Ray): ``run_pretraining`` with the MLflow reporter and the
    final k-NN report."""
    from semlab.eval.knn_report import FinalKnn
    from semlab.eval.training_knn import training_knn
    from semlab.train.pretraining import run_pretraining

    reporter = None
    if bool(cfg.mlflow.enabled):
        from semlab.tracking import MLflowReporter

        reporter = MLflowReporter(cfg, output_dir, recipe=recipe, resume=resume)
    try:
        return run_pretraining(
            cfg, output_dir, resume, reporter, evaluate=FinalKnn(cfg, output_dir),
            evaluate_during_training=training_knn(cfg),
        )  # fmt: skip
    except BaseException:  # NaN, disk full, Ctrl-C...: the MLflow run ends FAILED, not RUNNING
        if reporter is not None:
            reporter.close("FAILED")
        raise


def latest_eval_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``eval/training_<it>/teacher_checkpoint.pth`` under ``output_dir``, if any."""
    found = []
    for path in output_dir.glob("eval/training_*/teacher_checkpoint.pth"):
        suffix = path.parent.name.removeprefix("training_")
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def evaluate_final_teacher(cfg: DictConfig, output_dir: Path, recipe: str | None) -> dict[str, float]:
    """Linear probe(s) of the last teacher eval checkpoint, logged onto the pretraining's MLflow run.

    Runs when ``evaluation.linear_after_train`` is set (the demo sets it); the k-NN already ran at
    the end of training. The MLflow run is the one recorded in ``<output_dir>/mlflow_run.json``.
    """
    if not bool(cfg.evaluation.linear_after_train):
        return {}
    checkpoint = latest_eval_checkpoint(output_dir)
    if checkpoint is None:
        logger.warning("evaluation.linear_after_train is set but %s has no eval checkpoint", output_dir)
        return {}
    from semlab.eval.auto import evaluate_after_pretraining

    reporter = None
    if bool(cfg.mlflow.enabled):
        from semlab.tracking import MLflowReporter

        reporter = MLflowReporter(cfg, output_dir, recipe=recipe, resume=True)
    try:
        metrics = evaluate_after_pretraining(cfg, output_dir, checkpoint, reporter=reporter, knn=False)
    finally:
        if reporter is not None:
            reporter.close()
    for name, what in (("linear_top1", "CLS tokens"), ("linear_sem_top1", "raw SEM simplices")):
        if name in metrics:
            print(f"linear probe on {what}: top-1 {metrics[name]:.1f}% on {cfg.evaluation.knn_dataset_val}")
    return metrics


def run_ray(cfg: DictConfig, output_dir: Path, resume: bool, recipe: str | None) -> Any:
    """Join or start the cluster, fit the TorchTrainer, and stop a cluster this process started."""
    from semlab.orchestration.cluster import connect
    from semlab.orchestration.trainer import fit

    handle = connect(cfg)
    try:
        _check_resources(cfg)
        return fit(cfg, output_dir, resume, recipe=recipe)
    finally:
        if handle.started:
            handle.shutdown()


def _check_resources(cfg: DictConfig) -> None:
    """Warn (not fail: an autoscaler may add nodes) when the cluster cannot hold the workers now."""
    from semlab.orchestration.cluster import cluster_resources

    have = cluster_resources()
    need_cpu = int(cfg.ray.num_workers) * float(cfg.ray.cpus_per_worker)
    need_gpu = int(cfg.ray.num_workers) * float(cfg.ray.gpus_per_worker) if bool(cfg.ray.use_gpu) else 0.0
    if need_cpu > have.get("CPU", 0.0) or need_gpu > have.get("GPU", 0.0):
        logger.warning(
            "the cluster has %s CPUs / %s GPUs now; %d workers need %s CPUs / %s GPUs: the run waits for "
            "the autoscaler (or forever on a fixed cluster). Lower ray.num_workers / ray.cpus_per_worker.",
            have.get("CPU", 0),
            have.get("GPU", 0),
            int(cfg.ray.num_workers),
            need_cpu,
            need_gpu,
        )
    if str(cfg.data.backend).lower() == "ray":
        from semlab.data.pipeline.ray_pipeline import check_cpu_budget

        check_cpu_budget(
            have.get("CPU", 0.0),
            int(cfg.ray.num_workers),
            float(cfg.ray.cpus_per_worker),
            float(cfg.data.map_num_cpus),
        )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, print a summary; returns the process exit code."""
    from semlab.config import ConfigError
    from semlab.orchestration.cluster import ClusterError, wants_ray
    from semlab.train.checkpointing import CheckpointWriteError
    from semlab.train.health import DivergedModelError
    from semlab.train.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from semlab.eval.eval_datasets import resolve_eval_datasets

    print(resolve_eval_datasets(cfg))
    output_dir = Path(args.output_dir).resolve()
    resume = not args.no_resume
    start = time.perf_counter()
    if args.local or not wants_ray(cfg):
        try:
            summary = run_local(cfg, output_dir, resume, args.config_file)
        except (NonFiniteLossError, DivergedModelError, CheckpointWriteError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        _print_summary(output_dir, summary.get("iteration"), time.perf_counter() - start)
        evaluate_final_teacher(cfg, output_dir, args.config_file)
        return 0
    try:
        result = run_ray(cfg, output_dir, resume, args.config_file)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = getattr(result, "metrics", None) or {}
    iteration = metrics.get("iteration")
    _print_summary(output_dir, iteration, time.perf_counter() - start)
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is not None:
        print(f"last Ray checkpoint: {checkpoint.path}")
    evaluate_final_teacher(cfg, output_dir, args.config_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
