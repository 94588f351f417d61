"""Full (resumable) checkpoints, automatic resume, and teacher-only eval checkpoints.

Layout under ``<output_dir>``::

    checkpoints/model_<it:07d>.pth          full checkpoint after iteration ``it`` (0-based, done)
    checkpoints/last_checkpoint             text file naming the newest full checkpoint
    eval/training_<it>/teacher_checkpoint.pth   {"teacher": teacher state dict}
    eval/training_<it>/config.yaml          the resolved config of the run

A full checkpoint is a dict of tensors / primitives / lists / dicts only (it loads with
``torch.load(weights_only=True)``)::

    format      "semlab.checkpoint.v1"
    iteration   last finished iteration (training resumes at iteration + 1)
    model       full state dict of the SSLMetaArch: student.*, teacher.*, dino_loss.center,
                ibot_patch_loss.center
    optimizer   full optimizer state dict (keyed by parameter names)
    rng         python / numpy / torch (/ cuda) generator states of rank 0
    data        {"consumed_iterations": iteration + 1, "seed": train.seed, "world_size": W}

States are gathered with ``torch.distributed.checkpoint.state_dict`` (full, CPU-offloaded), so
the same code saves and restores FSDP2-sharded models; only rank 0 writes. Every file is written
atomically (temp file + rename) and the pointer is updated only after its checkpoint is complete.
On resume the pointed-to checkpoint is loaded and checked; if it is unreadable, the newest older
checkpoint that loads is used instead, with a warning.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from semlab.config import save_config
from semlab.utils import distributed
from semlab.utils.atomic import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "semlab.checkpoint.v1"
CKPT_DIR = "checkpoints"
POINTER = "last_checkpoint"
_NAME_RE = re.compile(r"^model_(\d{7,})\.pth$")
REQUIRED_KEYS = ("format", "iteration", "model", "optimizer", "rng", "data")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read or lacks what a semlab checkpoint holds."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); older ones are intact."""


def _write(obj: Any, path: Path) -> None:
    """``torch.save`` atomically; a failure (torch reports a full disk as 'unexpected pos') becomes a
    :class:`CheckpointWriteError` that says where, why and how much space is left."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except Exception as exc:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(
            f"cannot write checkpoint {path} ({type(exc).__name__}: {exc}; {free}). The disk may be full: "
            "free space (or move --output-dir) and rerun; the run resumes from the last complete checkpoint, "
            "which is untouched."
        ) from exc


# --------------------------------------------------------------------------- paths
def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CKPT_DIR


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"model_{iteration:07d}.pth"


def eval_checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the full checkpoints on disk, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# --------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """Generator states as tensors and primitives (no numpy objects)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save
def _prune(output_dir: Path, max_to_keep: int, keep: Path) -> None:
    if max_to_keep <= 0:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - max_to_keep, 0)]:
        if path != keep:
            path.unlink(missing_ok=True)


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    output_dir: str | Path,
    cfg: DictConfig,
) -> Path:
    """Write ``checkpoints/model_<it>.pth`` atomically, then the ``last_checkpoint`` pointer.

    Collective: every rank must call it (state dicts are gathered); rank 0 writes. Keeps the newest
    ``train.max_to_keep`` checkpoints (<= 0 keeps all). Returns the checkpoint path.
    """
    # a pending (async) center update would otherwise be lost: apply it now (the next centering
    # would apply it first anyway, so this does not change the training trajectory)
    for loss_name in ("dino_loss", "ibot_patch_loss"):
        loss = getattr(model, loss_name, None)
        if loss is not None and hasattr(loss, "apply_center_update"):
            loss.apply_center_update()
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    path = checkpoint_path(output_dir, iteration)
    if distributed.is_main_process():
        ckpt = {
            "format": FORMAT,
            "iteration": int(iteration),
            "model": model_sd,
            "optimizer": optim_sd,
            "rng": get_rng_state(),
            "data": {
                "consumed_iterations": int(iteration) + 1,
                "seed": int(cfg.train.seed),
                "world_size": distributed.get_world_size(),
            },
        }
        _write(ckpt, path)
        atomic_write_text(checkpoint_dir(output_dir) / POINTER, path.name + "\n")
        _prune(Path(output_dir), int(cfg.train.max_to_keep), keep=path)
    distributed.barrier()
    return path


def teacher_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's full state dict (``backbone.*``, ``dino_head.*``[, ``ibot_head.*``]); collective."""
    return get_model_state_dict(model.teacher, options=FULL)


def save_eval_checkpoint(model: nn.Module, iteration: int, output_dir: str | Path, cfg: DictConfig) -> Path:
    """Write ``eval/training_<it>/teacher_checkpoint.pth`` = ``{"teacher": state_dict}`` and the config.

    The keys are the teacher modules' own (``backbone.blocks.<i>...`` or, with ``block_chunks``,
    ``backbone.blocks.<c>.<i>...``), i.e. the reference layout; ``semlab.models.load_weights`` reads
    it. Collective; rank 0 writes.
    """
    state = teacher_state_dict(model)
    path = eval_checkpoint_path(output_dir, iteration)
    if distributed.is_main_process():
        _write({"teacher": state}, path)
        save_config(cfg, path.parent / "config.yaml")
    distributed.barrier()
    return path


# --------------------------------------------------------------------------- load
def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` and check the keys; raises ``CheckpointLoadError``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt / foreign pickles
        raise CheckpointLoadError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointLoadError(
            f"{path} is not a semlab full checkpoint (needs keys {list(REQUIRED_KEYS)}, has {have})"
        )
    if ckpt["format"] != FORMAT:
        raise CheckpointLoadError(f"{path} has format {ckpt['format']!r}, expected {FORMAT!r}")
    return ckpt


def remove_partial_files(output_dir: str | Path) -> list[Path]:
    """Delete the temp files (``.model_*.tmp``, ``.teacher_checkpoint.pth.*.tmp``) a killed writer left
    under ``checkpoints/`` and ``eval/``; they are never complete. Returns what was removed. Call it
    only when no writer runs (at the start of a run)."""
    out = Path(output_dir)
    partial = [*checkpoint_dir(out).glob(".*.tmp"), *out.glob("eval/training_*/.*.tmp")]
    for path in partial:
        path.unlink(missing_ok=True)
        logger.info("removed partial file %s left by an interrupted write", path)
    return partial


def find_resume_checkpoint(
    output_dir: str | Path, param_abs_limit: float = float("inf")
) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable, healthy full checkpoint, starting from the one ``last_checkpoint`` names.

    Unreadable candidates, and those whose student/teacher weights are non-finite or exceed
    ``param_abs_limit`` (:mod:`semlab.train.health`), are skipped with a warning (falling back to
    older checkpoints); returns None when there is nothing to resume from.
    """
    from semlab.train.health import state_problem

    found = list_checkpoints(output_dir)
    candidates = [p for _, p in reversed(found)]
    pointer = checkpoint_dir(output_dir) / POINTER
    if pointer.is_file():
        named = checkpoint_dir(output_dir) / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
        candidates.insert(0, named)
    for i, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint_file(path)
            problem = state_problem(ckpt["model"], param_abs_limit)
            if problem is not None:
                raise CheckpointLoadError(f"diverged weights: {problem}")
        except CheckpointLoadError as exc:
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
            msg = f"skipping checkpoint {path}: {exc}; " + (
                f"falling back to {nxt}" if nxt else "no older checkpoint left, starting from scratch"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.warning(msg)
            continue
        return path, ckpt
    return None


def restore_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict[str, Any], restore_rng: bool = True
) -> int:
    """Load model (+ optimizer, + RNG) state from a loaded checkpoint; returns its iteration."""
    set_model_state_dict(model, ckpt["model"], options=FULL)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=FULL)
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return int(ckpt["iteration"])


def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise student and teacher from ``MODEL.pretrained_backbone``, the one initial-weights key.

    Accepted, by content:

    - a semlab full checkpoint (its ``model`` entry; optimizer and iteration are not used);
    - a teacher checkpoint ``{"teacher": {...}}`` (semlab or reference layout) holding every student
      module (``backbone.*``, ``dino_head.*``[, ``ibot_head.*``]): all are loaded into the student;
    - anything else ``semlab.models.load_weights`` reads (a released DINOv2 backbone, a teacher
      checkpoint without heads...): the backbone only (its SEM layers may be missing).

    The teacher is then a copy of the student.
    """
    from semlab.models import load_weights, read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except Exception as exc:
        raise CheckpointLoadError(
            f"cannot read MODEL.pretrained_backbone={path}: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(ckpt, dict) and "model" in ckpt and "format" in ckpt:
        set_model_state_dict(model, ckpt["model"], options=FULL)
        return
    teacher = ckpt.get("teacher") if isinstance(ckpt, dict) else None
    parts = {}
    if isinstance(teacher, dict):
        parts = {key: {k[len(key) + 1 :]: v for k, v in teacher.items() if k.startswith(f"{key}.")}
                 for key in model.student}
    if parts and all(parts.values()):
        for key, sub in parts.items():
            load_weights(model.student[key], sub)
    else:
        backbone = model.student["backbone"]
        load_weights(backbone, ckpt, allow_missing_sem=bool(getattr(backbone, "has_sem", False)))
    model.copy_student_to_teacher()
