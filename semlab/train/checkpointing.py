"""Full (resumable) sharded checkpoints, automatic resume, and teacher-only eval checkpoints.

Layout under ``<output_dir>``::

    checkpoints/model_<it:07d>/             full checkpoint after iteration ``it`` (0-based, done),
        __<rank>_0.distcp                   one shard file per rank (torch.distributed.checkpoint)
        .metadata                           DCP's index of the shards (rank 0, written last by DCP)
        trainer_state.pt                    iteration, RNG, data position (rank 0, torch.save)
    checkpoints/last_checkpoint             text file naming the newest complete full checkpoint
    eval/training_<it>/teacher_checkpoint.pth   {"teacher": teacher state dict} (the seed's layout)
    eval/training_<it>/config.yaml          the resolved config of the run

The training state (student, teacher, both loss centers and the AdamW moments) is written with
``torch.distributed.checkpoint`` (DCP) from the *sharded* state dicts of
``torch.distributed.checkpoint.state_dict``: each rank writes only the FSDP2 shards it holds, no
rank ever gathers the full model, and loading reshards onto any number of ranks (3 workers ->
2, 4 GPUs -> 8, or a single process). ``trainer_state.pt`` is a dict of tensors and primitives
only (``torch.load(weights_only=True)``)::

    format      "semlab.checkpoint.v2"
    iteration   last finished iteration (training resumes at iteration + 1)
    rng         python / numpy / torch (/ cuda) generator states of rank 0
    data        {"consumed_iterations": iteration + 1, "seed": train.seed, "world_size": W}

Commit order: every rank's shard files -> ``.metadata`` (DCP, temp + rename) -> ``trainer_state.pt``
(atomic) -> ``last_checkpoint`` (atomic). A folder without ``.metadata`` or ``trainer_state.pt`` is
an interrupted write and is never resumed from; on resume the pointed-to checkpoint is checked
and, when incomplete or unreadable, the newest older complete one is used, with a warning.
Pruning keeps the newest ``train.max_to_keep`` folders (under Ray Train the worker sets it to 1:
Ray's storage holds the checkpoints and the local folder is only a cache, see
``semlab.orchestration.worker``).

The teacher eval checkpoint gathers the teacher alone (a quarter of the training state) on rank 0,
CPU-offloaded, because the seed's evaluation commands read that single ``.pth`` file.
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
import torch.distributed.checkpoint as dcp
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

FORMAT = "semlab.checkpoint.v2"
CKPT_DIR = "checkpoints"
POINTER = "last_checkpoint"
_NAME_RE = re.compile(r"^model_(\d{7,})$")
TRAINER_STATE = "trainer_state.pt"
DCP_METADATA = ".metadata"
REQUIRED_KEYS = ("format", "iteration", "rng", "data")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read or lacks what a semlab checkpoint holds."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); older ones are intact."""


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    """The error for a failed write of ``path`` (torch reports a full disk as 'unexpected pos'): where,
    why, and how much space is left."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return CheckpointWriteError(
        f"cannot write checkpoint {path} ({type(exc).__name__}: {exc}; {free}). The disk may be full: "
        "free space (or move --output-dir) and rerun; the run resumes from the last complete checkpoint, "
        "which is untouched."
    )


def _write(obj: Any, path: Path) -> None:
    """``torch.save`` atomically; a failure becomes a :class:`CheckpointWriteError`."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except Exception as exc:
        raise _write_error(path, exc) from exc


# --------------------------------------------------------------------------- paths
def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CKPT_DIR


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    """The folder of the full checkpoint of ``iteration``."""
    return checkpoint_dir(output_dir) / f"model_{iteration:07d}"


def eval_checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, folder) of the full checkpoints on disk (complete or not), oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir():
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
def _dcp_options() -> dict[str, Any]:
    """DCP without collectives in a single process (no default process group)."""
    return {} if distributed.is_enabled() else {"no_dist": True}


def _dcp(fn: Any, state: dict[str, Any], path: Path) -> None:
    """``dcp.save`` / ``dcp.load`` of ``state`` at folder ``path``; in a single process, without the
    warning DCP gives even when ``no_dist`` is asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        fn(state, checkpoint_id=str(path), **_dcp_options())


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` as *sharded* state dicts (DTensors under FSDP2): what DCP
    saves and loads in place. Collective under FSDP2; never gathers a full tensor."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def _prune(output_dir: Path, max_to_keep: int, keep: Path) -> None:
    """Delete the oldest checkpoint folders beyond ``max_to_keep`` (<= 0 keeps all). Every rank
    calls it (ranks of other nodes hold their own shard files); concurrent deletes are harmless."""
    if max_to_keep <= 0:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - max_to_keep, 0)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    output_dir: str | Path,
    cfg: DictConfig,
) -> Path:
    """Write the sharded checkpoint folder ``checkpoints/model_<it>/``, then the pointer.

    Collective: every rank writes its own shard file ``__<rank>_0.distcp`` (DCP); rank 0 also writes
    ``.metadata``, ``trainer_state.pt`` and ``last_checkpoint``. Keeps the newest
    ``train.max_to_keep`` folders (<= 0 keeps all). Returns the folder.
    """
    # a pending (async) center update would otherwise be lost: apply it now (the next centering
    # would apply it first anyway, so this does not change the training trajectory)
    for loss_name in ("dino_loss", "ibot_patch_loss"):
        loss = getattr(model, loss_name, None)
        if loss is not None and hasattr(loss, "apply_center_update"):
            loss.apply_center_update()
    path = checkpoint_path(output_dir, iteration)
    if path.exists() and distributed.is_main_process():
        shutil.rmtree(path)  # a leftover of an interrupted attempt at the same iteration
    distributed.barrier()
    path.mkdir(parents=True, exist_ok=True)
    try:
        _dcp(dcp.save, training_state(model, optimizer), path)
    except Exception as exc:  # a full disk or quota; the folder stays incomplete (no .metadata)
        raise _write_error(path, exc) from exc
    if distributed.is_main_process():
        state = {
            "format": FORMAT,
            "iteration": int(iteration),
            "rng": get_rng_state(),
            "data": {
                "consumed_iterations": int(iteration) + 1,
                "seed": int(cfg.train.seed),
                "world_size": distributed.get_world_size(),
            },
        }
        _write(state, path / TRAINER_STATE)
        atomic_write_text(checkpoint_dir(output_dir) / POINTER, path.name + "\n")
    distributed.barrier()
    _prune(Path(output_dir), int(cfg.train.max_to_keep), keep=path)
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
    """The ``trainer_state.pt`` of checkpoint folder ``path``, after checking that the folder is
    complete (DCP ``.metadata`` present); raises ``CheckpointLoadError``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointLoadError(
            f"{path} is not a semlab checkpoint folder (a sharded checkpoint is a folder "
            f"checkpoints/model_<iteration>/ holding {DCP_METADATA}, {TRAINER_STATE} and *.distcp shards)"
        )
    if not (path / DCP_METADATA).is_file():
        raise CheckpointLoadError(f"{path} is incomplete: no DCP {DCP_METADATA} (an interrupted write)")
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing / truncated / corrupt / foreign pickles
        raise CheckpointLoadError(
            f"cannot read {path / TRAINER_STATE}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointLoadError(
            f"{path / TRAINER_STATE} is not a semlab trainer state "
            f"(needs keys {list(REQUIRED_KEYS)}, has {have})"
        )
    if state["format"] != FORMAT:
        raise CheckpointLoadError(f"{path} has format {state['format']!r}, expected {FORMAT!r}")
    return state


def remove_partial_files(output_dir: str | Path) -> list[Path]:
    """Delete the temp files a killed writer left (``.trainer_state.pt.*.tmp`` in a checkpoint folder,
    ``.teacher_checkpoint.pth.*.tmp`` under ``eval/``); they are never complete. Incomplete DCP
    folders (no ``.metadata``) are skipped by :func:`find_resume_checkpoint` and pruned like old ones.
    Returns what was removed. Call it only when no writer runs (at the start of a run)."""
    out = Path(output_dir)
    partial = [
        *checkpoint_dir(out).glob(".*.tmp"),
        *checkpoint_dir(out).glob("model_*/.*.tmp"),
        *out.glob("eval/training_*/.*.tmp"),
    ]
    for path in partial:
        path.unlink(missing_ok=True)
        logger.info("removed partial file %s left by an interrupted write", path)
    return partial


def find_resume_checkpoint(
    output_dir: str | Path, accept: Any = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete full checkpoint folder and its trainer state, starting from the one
    ``last_checkpoint`` names.

    Incomplete or unreadable candidates are skipped with a warning (falling back to older
    checkpoints), and so are those for which ``accept(path, state)`` returns a problem (a sentence;
    the loop restores the candidate and checks its weights, :mod:`semlab.train.health`). Returns None
    when there is nothing to resume from.
    """
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
            state = load_checkpoint_file(path)
            problem = accept(path, state) if accept is not None else None
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
        return path, state
    return None


def restore_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    path: str | Path,
    state: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> int:
    """Load model (+ optimizer, + RNG) state from checkpoint folder ``path`` into this rank's shards
    (DCP reads only the bytes each rank needs, whatever the saving world size); returns its
    iteration. Collective under FSDP2."""
    path = Path(path)
    state = state if state is not None else load_checkpoint_file(path)
    target = training_state(model, optimizer)
    try:
        _dcp(dcp.load, target, path)
    except Exception as exc:  # shapes of another model, missing keys, unreadable shard files
        raise CheckpointLoadError(
            f"cannot restore {path} into this model: {type(exc).__name__}: {exc}; the checkpoint must come "
            "from a run with the same student/teacher configuration"
        ) from exc
    set_model_state_dict(model, target["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, target["optimizer"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["iteration"])

def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise student and teacher from ``MODEL.pretrained_backbone``, the one initial-weights key.

    Accepted, by content:

    - a semlab full checkpoint folder ``checkpoints/model_<it>/`` (its model state, read with DCP;
      optimizer and iteration are not used);
    - a teacher checkpoint ``{"teacher": {...}}`` (semlab or reference layout) holding every student
      module (``backbone.*``, ``dino_head.*``[, ``ibot_head.*``]): all are loaded into the student;
    - anything else ``semlab.models.load_weights`` reads (a released DINOv2 backbone, a teacher
      checkpoint without heads...): the backbone only (its SEM layers may be missing).

    The teacher is then a copy of the student.
    """
    from semlab.models import load_weights, read_checkpoint

    if Path(path).is_dir():
        load_checkpoint_file(path)  # a clear error when the folder is not a complete checkpoint
        target = {"model": get_model_state_dict(model)}
        _dcp(dcp.load, target, Path(path))
        set_model_state_dict(model, target["model"])
        return
    try:
        ckpt = read_checkpoint(path)
    except Exception as exc:
        raise CheckpointLoadError(
            f"cannot read MODEL.pretrained_backbone={path}: {type(exc).__name__}: {exc}"
        ) from exc
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


def rank_files(folder: str | Path, rank: int) -> list[Path]:
    """The files of checkpoint ``folder`` that rank ``rank`` wrote: its DCP shards
    ``__<rank>_<i>.distcp``, and for rank 0 also ``.metadata`` and ``trainer_state.pt`` (what each
    rank uploads to Ray's storage, where the ranks' files together make the checkpoint)."""
    folder = Path(folder)
    files = sorted(folder.glob(f"__{int(rank)}_*.distcp"))
    if int(rank) == 0:
        files += [p for p in (folder / DCP_METADATA, folder / TRAINER_STATE) if p.is_file()]
    return files
