"""The per-worker training loop (iteration-based, as DINOv2's ``do_train``).

For ``it`` in ``[start, max_iter)``, with ``max_iter = optim.epochs * OFFICIAL_EPOCH_LENGTH``
(or ``train.max_iterations`` when > 0; the schedules always span the full recipe)::

    batch = next(data)
    lr, wd, mom, T_t, lr_last = schedules[it]      # per group: lr * lr_mult, wd * wd_mult
    zero_grad; losses = model.forward_backward(batch, T_t)     # backward inside
    losses all-reduced for logging (mean over ranks); non-finite total -> NonFiniteLossError
      (train.sync_free_step: checked on the device, read at log periods and before checkpoints)
    clip_grad_norm_(each student module, optim.clip_grad); optimizer.step()
    model.update_teacher(mom)
    (it + 1) % eval_period == 0     -> eval/training_<it>/teacher_checkpoint.pth, then the
                                       ``evaluate`` hook (all ranks) -> reporter.on_training_evaluation
    (it + 1) % checkpoint_period == 0 or it == max_iter - 1 -> checkpoints/model_<it>/ (sharded)

The loop takes a data iterator (or a factory ``start_iter -> iterator``, so that a resumed run
continues the data stream where the checkpoint left it) and a ``Reporter``; it knows nothing of
Ray or MLflow. Gradient synchronisation is the job of the caller's parallelisation (FSDP2/DDP).
A non-finite loss stops the run *before* the optimizer step, and before any checkpoint the student
and teacher parameters must be finite and within ``train.param_abs_limit``
(:mod:`semlab.train.health`; else ``DivergedModelError``), so no checkpoint is ever written from a
diverged model and the last good checkpoint stays the resume point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from semlab.config import apply_scaling_rules
from semlab.train.checkpointing import (
    find_resume_checkpoint,
    load_checkpoint_file,
    remove_partial_files,
    restore_checkpoint,
    save_checkpoint,
    save_eval_checkpoint,
    set_rng_state,
)
from semlab.train.health import DivergedModelError, model_problem, param_limit
from semlab.train.param_groups import apply_optim_schedule, build_optimizer
from semlab.train.progress import eta_seconds, log_progress
from semlab.train.reporting import Reporter
from semlab.train.schedules import build_schedules
from semlab.train.sync_free import DeviceStepStats, FiniteWatch
from semlab.utils import distributed
from semlab.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "training_metrics.json"
DataSource = Iterator[dict[str, Any]] | Callable[[int], Iterator[dict[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """The total loss became NaN/inf; training stopped before the optimizer step."""

    def __init__(self, iteration: int, losses: dict[str, float], checkpoint: Path | None) -> None:
        self.iteration = iteration
        self.losses = dict(losses)
        self.checkpoint = checkpoint
        parts = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss at iteration {iteration} ({parts}); training stopped without stepping the "
            f"optimizer and without writing a checkpoint; {where}. Lower optim.base_lr, raise "
            "teacher.warmup_teacher_temp_epochs or check the data."
        )


def max_iterations(cfg: DictConfig) -> int:
    """``train.max_iterations`` when > 0, else ``optim.epochs * train.OFFICIAL_EPOCH_LENGTH``."""
    if int(cfg.train.max_iterations) > 0:
        return int(cfg.train.max_iterations)
    return int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH)


def checkpoint_period(cfg: DictConfig) -> int:
    """Iterations between full checkpoints: ``train.checkpoint_period_iterations`` when > 0, else the
    reference's ``3 * OFFICIAL_EPOCH_LENGTH`` (3,750 in the recipe). Like the reference's
    ``PeriodicCheckpointer``, this ignores ``train.saveckp_freq``."""
    if int(cfg.train.checkpoint_period_iterations) > 0:
        return int(cfg.train.checkpoint_period_iterations)
    return 3 * int(cfg.train.OFFICIAL_EPOCH_LENGTH)


class MetricsLog:
    """JSON lines at ``<output_dir>/training_metrics.json``, one object per logged iteration.

    Each line is appended with a single ``write`` on an ``O_APPEND`` descriptor (a crash leaves
    whole lines). On resume, lines of iterations >= the resume point are dropped (atomic rewrite),
    so the log never holds an iteration twice.
    """

    def __init__(self, path: Path, start_iteration: int) -> None:
        self.path = path
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", -1) < start_iteration:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a crash
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _reduce_losses_on_device(loss_dict: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """(sorted keys, stacked values): each loss part's mean over ranks (one all-reduce), on the device."""
    keys = sorted(loss_dict)
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in keys])
    if distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
        values /= distributed.get_world_size()
    return keys, values


def _reduce_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of each loss part (one all-reduce), as Python floats."""
    keys, values = _reduce_losses_on_device(loss_dict)
    return dict(zip(keys, values.cpu().tolist()))


def student_gradient_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip each student module's gradient norm separately (as the reference); the total norm
    ``sqrt(sum_m norm_m^2)`` as a 0-d device tensor (no host sync)."""
    squares = []
    for module in model.student.values():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        squares.append(norm.float().reshape(()) ** 2)
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


def clip_student_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """:func:`student_gradient_norm` as a Python float."""
    return float(student_gradient_norm(model, max_norm))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    clip_grad: float,
) -> tuple[dict[str, float], float]:
    """One optimisation step at the schedule values ``sched`` -> (losses mean over ranks, grad norm).

    Sets lr / wd per group, runs ``forward_backward`` (backward inside), raises
    :class:`NonFiniteLossError` (iteration -1: the caller knows it) before stepping on a NaN/inf
    loss, clips each student module at ``clip_grad``, steps AdamW and moves the EMA teacher.
    """
    apply_optim_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=sched["teacher_temp"])
    losses = _reduce_losses(loss_dict)
    if not all(math.isfinite(v) for v in losses.values()):
        raise NonFiniteLossError(-1, losses, None)
    grad_norm = clip_student_gradients(model, clip_grad)
    optimizer.step()
    model.update_teacher(sched["mom"])
    return losses, grad_norm


def train_step_sync_free(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    clip_grad: float,
) -> DeviceStepStats:
    """:func:`train_step` without host syncs (``train.sync_free_step``, :mod:`semlab.train.sync_free`):
    losses, grad norm and the finiteness flag stay on the device; the caller checks the flag later,
    so the optimizer steps whatever the loss."""
    apply_optim_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=sched["teacher_temp"])
    keys, values = _reduce_losses_on_device(loss_dict)
    finite = torch.isfinite(values).all()
    grad_norm = student_gradient_norm(model, clip_grad)
    optimizer.step()
    model.update_teacher(sched["mom"])
    return DeviceStepStats(dict(zip(keys, values.unbind(0))), grad_norm, finite)


class ThroughputWindow:
    """Images, wall time and data time since the last log line (reset by :meth:`record`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.images, self.time_s, self.data_time_s, self.iterations = 0, 0.0, 0.0, 0

    def add(self, images: int, step_s: float, data_s: float) -> None:
        self.iterations += 1
        self.images += images
        self.time_s += step_s
        self.data_time_s += data_s

    def record(self, iteration: int, losses: dict[str, float], sched: dict[str, float], grad_norm: float,
               max_iter: int = 0) -> dict[str, Any]:
        """The metrics line of ``iteration`` (losses, schedule values, speed, ETA to ``max_iter``);
        starts a new window."""
        record: dict[str, Any] = {"iteration": iteration, **losses}
        record.update({key: sched[key] for key in ("lr", "wd", "mom", "teacher_temp", "last_layer_lr")})
        record.update(
            {
                "grad_norm": grad_norm,
                "images_per_s": self.images / max(self.time_s, 1e-9),
                "data_time_s": self.data_time_s,
                "window_time_s": self.time_s,
                "window_iterations": self.iterations,
                "eta_s": eta_seconds(iteration, max_iter, self.time_s, self.iterations),
            }
        )
        self.reset()
        return record


def is_due(iteration: int, period: int) -> bool:
    """True at the last iteration of each ``period`` (never when ``period`` <= 0)."""
    return period > 0 and (iteration + 1) % period == 0


def resume_point(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    output_dir: Path,
    resume: bool,
    resume_from: str | Path | None = None,
    param_abs_limit: float = math.inf,
) -> tuple[int, dict[str, Any] | None, Path | None]:
    """(first iteration, RNG state to restore, checkpoint folder) of the checkpoint to resume from:
    ``resume_from`` when given (e.g. the checkpoint Ray Train hands a restarted worker), else the
    newest complete and healthy checkpoint of ``output_dir`` when ``resume`` (weights finite and
    within ``param_abs_limit``, checked after restoring each candidate); else ``(0, None, None)``:
    the model keeps the weights it was built with (``MODEL.pretrained_backbone``, loaded by
    ``SSLMetaArch``). Partial files a killed writer left are removed first (rank 0)."""
    if resume and distributed.is_main_process():
        remove_partial_files(output_dir)
    rejected: list[str] = []

    def restore_if_healthy(path: Path, state: dict[str, Any]) -> str | None:
        restore_checkpoint(model, optimizer, path, state, restore_rng=False)
        problem = model_problem(model, param_abs_limit)
        if problem is not None:
            rejected.append(f"{path.name}: {problem}")
        return problem

    if resume_from is not None:
        found = (Path(resume_from), load_checkpoint_file(resume_from))
        problem = restore_if_healthy(*found)
        if problem is not None:
            raise DivergedModelError(int(found[1]["iteration"]), problem, None)
    else:
        found = find_resume_checkpoint(output_dir, accept=restore_if_healthy) if resume else None
    if found is None:
        if rejected:  # the model now holds a rejected checkpoint's weights: never train on from them
            raise DivergedModelError(-1, "every checkpoint failed the health check (" + "; ".join(rejected)
                                     + "); start over with --no-resume", None)
        return 0, None, None
    last_ckpt, state = found
    start = int(state["iteration"]) + 1
    logger.info("resumed from %s (saved by %s ranks): starting at iteration %d",
                last_ckpt, state["data"].get("world_size", "?"), start)
    return start, state["rng"], last_ckpt


def _show_progress() -> bool:
    return distributed.is_main_process() and sys.stderr.isatty()


def do_train(
    cfg: DictConfig,
    model: torch.nn.Module,
    data_iter: DataSource,
    output_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    resume: bool = True,
    start_iteration: int | None = None,
    resume_from: str | Path | None = None,
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (an ``SSLMetaArch``, possibly parallelised) and return a summary dict.

    ``data_iter``: an iterator of batch dicts, or a callable ``start_iter -> iterator`` (preferred:
    after a resume it is called with the number of batches already consumed). ``resume``: continue
    from ``<output_dir>/checkpoints/last_checkpoint`` if present (else the model's own weights).
    ``start_iteration``: force the first iteration (callers that restore state themselves);
    default: the resumed checkpoint's iteration + 1, or 0. ``resume_from``: a checkpoint folder to
    resume from instead of ``output_dir``'s own (Ray Train's restored checkpoint).
    ``evaluate(model, it) -> metrics``: called on every rank at each eval period (it may be
    collective; metrics on rank 0, {} elsewhere), handed to ``reporter.on_training_evaluation``.
    Raises ``NonFiniteLossError`` on a NaN/inf total loss.
    """
    output_dir = Path(output_dir if output_dir is not None else cfg.train.output_dir)
    # hooks run on rank 0, except for reporters whose checkpoint hooks are collective (Ray's report)
    is_main, world = distributed.is_main_process(), distributed.get_world_size()
    if reporter is None or not (reporter.all_ranks or is_main):
        reporter = Reporter()
    apply_scaling_rules(cfg, world)
    model.train()
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    schedules = build_schedules(cfg)
    max_iter, ckpt_period = max_iterations(cfg), checkpoint_period(cfg)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    log_period = max(int(cfg.train.log_period_iterations), 1)
    clip = float(cfg.optim.clip_grad or 0.0)
    limit = param_limit(cfg)

    start, rng_state, last_ckpt = resume_point(model, optimizer, output_dir, resume, resume_from, limit)
    start = int(start_iteration) if start_iteration is not None else start
    model.train()
    batches: Iterator[dict[str, Any]] = data_iter(start) if callable(data_iter) else data_iter
    if rng_state is not None:  # after the data iterator was built, which may draw from the RNGs
        set_rng_state(rng_state)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_log = MetricsLog(output_dir / METRICS_FILE, start)
    window, eval_paths, losses = ThroughputWindow(), [], {}
    sync_free, watch = bool(cfg.train.sync_free_step), FiniteWatch()
    bar = tqdm(
        total=max_iter, initial=start, disable=not _show_progress(), desc="pretrain", dynamic_ncols=True
    )
    it = start - 1
    try:
        for it in range(start, max_iter):
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            sched = schedules.at(it)
            due_log = is_due(it, log_period) or it == max_iter - 1
            due_ckpt = is_due(it, eval_period) or is_due(it, ckpt_period) or it == max_iter - 1
            if sync_free:
                stats = train_step_sync_free(model, optimizer, batch, sched, clip)
                watch.add(it, stats)
                if due_log or due_ckpt:  # the deferred finiteness check: one sync per period
                    bad = watch.first_bad()
                    if bad is not None:
                        raise NonFiniteLossError(bad[0], bad[1], last_ckpt)
                    if due_log:
                        losses, grad_norm = stats.to_host()
            else:
                try:
                    losses, grad_norm = train_step(model, optimizer, batch, sched, clip)
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(it, exc.losses, last_ckpt) from None
            images = int(batch["collated_global_crops"].shape[0] // 2) * world
            window.add(images, time.perf_counter() - t0, t_data)
            bar.update(1)
            if due_log:
                record = window.record(it, losses, sched, grad_norm, max_iter)
                if is_main:
                    metrics_log.append(record)
                    log_progress(record, max_iter)
                reporter.on_metrics(it, record)  # rank 0, or every rank for an all-ranks reporter
                bar.set_postfix(loss=f"{losses['total']:.3f}", lr=f"{sched['lr']:.2e}")
            if due_ckpt:
                problem = model_problem(model, limit)  # a checkpoint is written only of a healthy model
                if problem is not None:
                    raise DivergedModelError(it, problem, last_ckpt)
            if is_due(it, eval_period):
                eval_paths.append(str(save_eval_checkpoint(model, it, output_dir, cfg)))
                reporter.on_eval_checkpoint(it, Path(eval_paths[-1]))
                if evaluate is not None:
                    reporter.on_training_evaluation(it, evaluate(model, it))
                    model.train()
            if is_due(it, ckpt_period) or it == max_iter - 1:
                last_ckpt = save_checkpoint(model, optimizer, it, output_dir, cfg)
                reporter.on_checkpoint(it, last_ckpt)
    finally:
        bar.close()
        close = getattr(batches, "close", None)
        if callable(data_iter) and close is not None:  # we built it: stop its worker processes
            close()

    summary = {
        "iteration": it,
        "max_iter": max_iter,
        "start_iteration": start,
        "losses": losses,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "eval_checkpoints": eval_paths,
        "output_dir": str(output_dir),
    }
    reporter.on_end(summary)
    return summary
