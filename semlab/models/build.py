"""Build backbones by architecture name or from a semlab config (``cfg.student.*``)."""

from __future__ import annotations

from typing import Any

from semlab.config.checks import check_sem
from semlab.models.vit import ARCHITECTURES, DinoVisionTransformer

_OVERRIDABLE = ("embed_dim", "depth", "num_heads")


def build_backbone(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """``ARCHITECTURES[arch](**kwargs)``: any :class:`DinoVisionTransformer` keyword overrides the arch's.

    ``L`` > 0 (with ``V``) adds SEM to any arch; the ``*_sem`` names only default to the recipe's
    L=512, V=256 (``vit_tiny_sem``: L=64, V=16).
    """
    name = arch.removesuffix("_memeff")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)


def backbone_kwargs(student: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`build_backbone` from the ``student`` config node (no drop path).

    Every key is read as is: ``semlab/config/ssl_default.yaml`` is the only table of defaults (a
    missing key is an error, not a silent second default). ``embed_dim`` / ``depth`` / ``num_heads``
    override the arch's only when not null; SEM is on iff ``student.L`` > 0.
    """
    kwargs: dict[str, Any] = {
        "img_size": int(student["img_size"]),
        "patch_size": int(student["patch_size"]),
        "init_values": student["layerscale"],
        "ffn_layer": str(student["ffn_layer"]),
        "block_chunks": int(student["block_chunks"]),
        "qkv_bias": bool(student["qkv_bias"]),
        "proj_bias": bool(student["proj_bias"]),
        "ffn_bias": bool(student["ffn_bias"]),
        "num_register_tokens": int(student["num_register_tokens"]),
        "interpolate_antialias": bool(student["interpolate_antialias"]),
        "interpolate_offset": float(student["interpolate_offset"]),
        "attention": str(student["attention"]),
        "pack_crops": bool(student["pack_crops"]),
    }
    for key in _OVERRIDABLE:
        if student[key] is not None:
            kwargs[key] = int(student[key])
    L, V, temp = int(student["L"]), int(student["V"]), float(student["temp"])
    check_sem(L, V, temp, arch=str(student["arch"]))
    if L > 0:
        kwargs.update(
            L=L,
            V=V,
            temp=temp,
            sem_variant=str(student["sem_variant"]),
            sem_norm=str(student["sem_norm"]),
        )
    return kwargs


def build_model_from_cfg(cfg: Any, only_teacher: bool = False) -> Any:
    """Student and teacher backbones from ``cfg.student`` -> ``(student, teacher, embed_dim)``.

    The teacher has no drop path; the student gets ``student.drop_path_rate`` and
    ``student.drop_path_uniform``. SEM is on iff ``student.L`` > 0. The pos-embed is defined for
    ``student.img_size`` (518 for the released weights) and interpolated to the crop sizes.
    With ``only_teacher=True`` returns ``(teacher, embed_dim)`` as the reference does.
    """
    if "student" not in cfg:
        raise ValueError("config has no 'student' section")
    student_cfg = cfg["student"]
    arch = str(student_cfg["arch"])
    kwargs = backbone_kwargs(student_cfg)
    teacher = build_backbone(arch, **kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = build_backbone(
        arch,
        **kwargs,
        drop_path_rate=float(student_cfg["drop_path_rate"]),
        drop_path_uniform=bool(student_cfg["drop_path_uniform"]),
    )
    return student, teacher, student.embed_dim
