"""Reading, converting and writing model weights.

:func:`load_weights` accepts, for a :class:`~semlab.models.vit.DinoVisionTransformer` or a
:class:`~semlab.models.heads.DINOHead` (or any module, with ``prefix``):

- a path to ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``: pickled objects other than
  tensors and plain containers are refused) or ``.safetensors``, or an in-memory state dict;
- the released DINOv2 backbones (``blocks.<i>.``), the reference SEM teacher checkpoints
  ``{"teacher": {"backbone.*", "dino_head.*"}}`` and their flattened forms (``teacher.backbone.*``;
  ``which="student"`` picks the student), ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers;
- the chunked block layout ``blocks.<chunk>.<i>.`` or the plain ``blocks.<i>.``, converted to the
  target model's layout either way;
- ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``_fsdp_wrapped_module.`` and
  ``_checkpoint_wrapped_module.`` wrapper prefixes, and ``backbone.`` / ``dino_head.`` parts.

The reference's unused ``sem_cls_norm.*`` entries are dropped (logged). A ``pos_embed`` of another
grid is resampled bicubically with the model's own interpolation settings (logged). Anything else
that does not match raises :class:`CheckpointError` listing missing and unexpected keys and shape
differences. ``allow_missing_sem=True`` starts a SEM backbone from a plain DINOv2 backbone, leaving
the SEM parameters at their initialisation (logged).

semlab's own layout (what :func:`save_weights` writes from a model's ``state_dict()``) is the
reference key layout of the model as built: ``blocks.<i>.`` for ``block_chunks`` 0 and
``blocks.<chunk>.<i>.`` otherwise; :func:`convert_block_layout` converts between the two.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semlab.models.heads import DINOHead
from semlab.models.vit import DinoVisionTransformer, interpolate_patch_pos_embed
from semlab.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_UNUSED_PREFIXES = ("sem_cls_norm.",)  # defined by the reference, never used in its forward
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_UNCHUNKED = re.compile(r"^blocks\.(\d+)\.(\D.*)$")
_LIST_LIMIT = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadResult:
    """What :func:`load_weights` did: keys loaded, left at init, dropped, resampled."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
    if suffix in (".pth", ".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, which are not loaded "
                f"(torch.load(weights_only=True) refused it: {str(exc).splitlines()[0]}); "
                "re-save it as a plain state dict"
            ) from exc
        except (RuntimeError, EOFError) as exc:
            raise CheckpointError(f"cannot read {path} as a torch checkpoint: {exc}") from exc
    raise CheckpointError(
        f"unsupported checkpoint suffix {suffix!r} for {path}; use .pth, .pt or .safetensors"
    )


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _unwrap(obj: Any, which: str) -> dict[str, Tensor]:
    """Descend into ``which`` / ``model`` / ``state_dict`` containers and flatten the rest to dotted keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    while not all(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in (which, *_CONTAINER_KEYS) if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    flat = _flatten(obj)
    others = {k: type(v).__name__ for k, v in flat.items() if not isinstance(v, Tensor)}
    if others:
        shown = ", ".join(f"{k} ({t})" for k, t in list(others.items())[:_LIST_LIMIT])
        raise CheckpointError(
            f"checkpoint entries that are not tensors: {shown}; pass a state dict of tensors"
        )
    if not flat:
        raise CheckpointError("the checkpoint holds no tensors")
    return flat


def _strip_wrappers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        for segment in _WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _select(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _top_prefixes(keys: Any) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})


def extract_state_dict(
    obj: Any,
    model: nn.Module | None = None,
    which: str = "teacher",
    prefix: str | None = None,
) -> dict[str, Tensor]:
    """The flat state dict meant for ``model`` inside a checkpoint object (see the module docstring)."""
    sd = _strip_wrappers(_unwrap(obj, which))
    model_keys = list(model.state_dict().keys()) if model is not None else []
    roles = ("teacher.", "student.")
    if any(k.startswith(roles) for k in sd) and not any(k.startswith(roles) for k in model_keys):
        chosen = _select(sd, f"{which}.")
        if not chosen:
            raise CheckpointError(
                f"checkpoint has no '{which}.' weights (its top-level prefixes: {_top_prefixes(sd)}); "
                "pass which='teacher' or which='student'"
            )
        sd = _strip_wrappers(chosen)
    if prefix:
        chosen = _select(sd, prefix)
        if not chosen:
            raise CheckpointError(
                f"no checkpoint key starts with {prefix!r} (top-level prefixes: {_top_prefixes(sd)})"
            )
        return chosen
    part = None
    if isinstance(model, DINOHead):
        part = "dino_head."
    elif isinstance(model, DinoVisionTransformer):
        part = "backbone."
    if part and any(k.startswith(part) for k in sd):
        others = sorted({p for p in _top_prefixes(k for k in sd if not k.startswith(part))})
        if others:
            logger.info("checkpoint: using the '%s' part, ignoring %s", part, ", ".join(others))
        sd = _select(sd, part)
    return sd


# ---------------------------------------------------------------------- block layout
def _unchunk(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _CHUNKED.match(key)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else key] = value
    return out


def convert_block_layout(
    sd: Mapping[str, Tensor], block_chunks: int, depth: int | None = None
) -> dict[str, Tensor]:
    """Rewrite block keys to ``blocks.<i>.`` (``block_chunks`` 0) or ``blocks.<i // (depth // k)>.<i>.``.

    The chunk of block i follows the reference: chunks of ``depth // block_chunks`` consecutive
    blocks. ``depth`` defaults to the number of blocks found in ``sd``.
    """
    flat = _unchunk(sd)
    if block_chunks <= 0:
        return flat
    indices = [int(m.group(1)) for k in flat if (m := _UNCHUNKED.match(k))]
    if depth is None:
        depth = max(indices) + 1 if indices else 0
    chunksize = max(depth // block_chunks, 1)
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        m = _UNCHUNKED.match(key)
        if m:
            i = int(m.group(1))
            key = f"blocks.{i // chunksize}.{i}.{m.group(2)}"
        out[key] = value
    return out


def _to_model_layout(sd: Mapping[str, Tensor], model_keys: list[str]) -> dict[str, Tensor]:
    flat = _unchunk(sd)
    chunk_of = {int(m.group(2)): int(m.group(1)) for k in model_keys if (m := _CHUNKED.match(k))}
    if not chunk_of:
        return flat
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        m = _UNCHUNKED.match(key)
        if m and int(m.group(1)) in chunk_of:
            key = f"blocks.{chunk_of[int(m.group(1))]}.{m.group(1)}.{m.group(2)}"
        out[key] = value
    return out


def _rename_legacy_head(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``torch.nn.utils.parametrizations.weight_norm`` keys -> ``weight_g`` / ``weight_v``."""
    names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        for old, new in names.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


# ------------------------------------------------------------------- pos-embed resize
def resample_pos_embed(
    pos_embed: Tensor, num_patches: int, antialias: bool = False, offset: float = 0.1, num_prefix: int = 1
) -> Tensor:
    """Resample a (1, num_prefix + M*M, D) position embedding to ``num_patches`` (a square) patch entries.

    Same math as the forward pass (:func:`~semlab.models.vit.interpolate_patch_pos_embed`), in float32,
    returned in the input dtype.
    """
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise CheckpointError(f"cannot resample pos_embed to {num_patches} patches: not a square grid")
    patch = interpolate_patch_pos_embed(
        pos_embed[:, num_prefix:], (side, side), antialias=antialias, offset=offset
    )
    return torch.cat((pos_embed[:, :num_prefix].float(), patch), dim=1).to(pos_embed.dtype)


# ------------------------------------------------------------------------- loading
def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LIST_LIMIT]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{len(items)} {title}: " + ", ".join(shown) + more


def _mismatch_message(
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    parts = [f"checkpoint does not fit {type(model).__name__}"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(
            _listing(
                "shape differences",
                [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched],
            )
        )
    hints = []
    if missing and all(k.startswith("sem_") for k in missing):
        hints.append("the checkpoint has no SEM weights: pass allow_missing_sem=True to start SEM from init")
    if any(k.startswith("sem_") for k in unexpected):
        hints.append("the checkpoint has SEM weights: build the model with student.L / student.V")
    if any(k.startswith(("backbone.", "dino_head.", "teacher.", "student.")) for k in unexpected):
        hints.append("pass prefix=... to pick the sub-model")
    if hints:
        parts.append("hint: " + "; ".join(hints))
    return "; ".join(parts)


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    prefix: str | None = None,
    which: str = "teacher",
    allow_missing_sem: bool = False,
) -> LoadResult:
    """Load ``source`` into ``model`` (in place) after converting its layout; see the module docstring.

    ``strict`` (default): any missing key, unexpected key or shape difference raises
    :class:`CheckpointError` (SEM keys may be missing with ``allow_missing_sem``). With
    ``strict=False`` the matching entries are loaded and the rest is logged as a warning.
    Models on the ``meta`` device get the checkpoint tensors assigned (``load_state_dict(assign=True)``).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    sd = extract_state_dict(obj, model, which=which, prefix=prefix)
    result = LoadResult()

    result.dropped = sorted(k for k in sd if k.startswith(_UNUSED_PREFIXES))
    if result.dropped:
        logger.info(
            "checkpoint: dropping %d entries unused by the reference forward: %s",
            len(result.dropped),
            ", ".join(result.dropped),
        )
        sd = {k: v for k, v in sd.items() if k not in result.dropped}

    model_sd = model.state_dict()
    model_keys = list(model_sd.keys())
    sd = _to_model_layout(_rename_legacy_head(sd), model_keys)

    pos = sd.get("pos_embed")
    target = model_sd.get("pos_embed")
    if (
        pos is not None
        and target is not None
        and pos.ndim == 3
        and target.ndim == 3
        and pos.shape != target.shape
        and pos.shape[-1] == target.shape[-1]
    ):
        antialias = bool(getattr(model, "interpolate_antialias", False))
        offset = float(getattr(model, "interpolate_offset", 0.1))
        sd["pos_embed"] = resample_pos_embed(pos, target.shape[1] - 1, antialias=antialias, offset=offset)
        result.interpolated.append("pos_embed")
        logger.info(
            "checkpoint: interpolated pos_embed from %s to %s (bicubic, antialias=%s, offset=%s)",
            list(pos.shape),
            list(target.shape),
            antialias,
            offset,
        )

    missing = [k for k in model_keys if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [
        (k, _shape(v), _shape(model_sd[k]))
        for k, v in sd.items()
        if k in model_sd and _shape(v) != _shape(model_sd[k])
    ]
    allowed_missing = [k for k in missing if allow_missing_sem and k.startswith("sem_")]
    hard_missing = [k for k in missing if k not in allowed_missing]
    if strict and (hard_missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(model, hard_missing, unexpected, mismatched))
    if not strict and (hard_missing or unexpected or mismatched):
        logger.warning(
            "checkpoint: loading what fits; %s",
            _mismatch_message(model, hard_missing, unexpected, mismatched),
        )
    if allowed_missing:
        logger.info(
            "checkpoint: SEM parameters not in the checkpoint stay at their initialisation: %s",
            ", ".join(allowed_missing),
        )

    bad = {k for k, _, _ in mismatched}
    to_load = {k: v for k, v in sd.items() if k in model_sd and k not in bad}
    on_meta = any(t.is_meta for t in model_sd.values())
    if not on_meta and any(t.is_meta for t in to_load.values()):
        raise CheckpointError(
            "checkpoint tensors are on the meta device (no data); they can only be "
            "loaded into a model built on the meta device"
        )
    if on_meta:
        to_load = {
            k: v.to(model_sd[k].dtype) if v.is_floating_point() and model_sd[k].is_floating_point() else v
            for k, v in to_load.items()
        }
    model.load_state_dict(to_load, strict=False, assign=on_meta)
    result.loaded = sorted(to_load)
    result.missing = missing
    result.unexpected = unexpected
    result.mismatched = mismatched
    return result


# ------------------------------------------------------------------------- writing
def save_weights(state_dict: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state_dict`` atomically (temp file + ``os.replace``); format by suffix.

    ``.safetensors`` needs a flat mapping of tensors (saved contiguous, on the CPU); ``.pth``/``.pt``
    take any mapping of tensors and plain containers (``torch.save``), e.g. ``{"teacher": sd}``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(
                f"safetensors stores only tensors; not tensors: {', '.join(bad[:_LIST_LIMIT])}"
            )
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    elif suffix in (".pth", ".pt"):
        with atomic_path(path) as tmp:
            torch.save(dict(state_dict), tmp)
    else:
        raise CheckpointError(
            f"unsupported checkpoint suffix {suffix!r} for {path}; use .pth, .pt or .safetensors"
        )
    return path
