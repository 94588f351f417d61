"""Build backbones by architecture name or from a semlab config (``cfg.student.*``)."""

from __future__ import annotations

from typing import Any

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


def _get(node: Any, key: str, default: Any = None) -> Any:
    """``node.key`` for a DictConfig, dict or attribute object; ``default`` when absent or None."""
    if node is None:
        return default
    if isinstance(node, dict):
        value = node.get(key, default)
    elif hasattr(node, "get"):
        try:
            value = node.get(key, default)
        except Exception:  # struct-mode configs without the key
            value = default
    else:
        value = getattr(node, key, default)
    return default if value is None else value


def backbone_kwargs(student: Any, img_size: int = 518) -> dict[str, Any]:
    """Keyword arguments for :func:`build_backbone` from the ``student`` config node (no drop path)."""
    kwargs: dict[str, Any] = {
        "img_size": int(_get(student, "img_size", img_size)),
        "patch_size": int(_get(student, "patch_size", 14)),
        "init_values": _get(student, "layerscale", None),
        "ffn_layer": str(_get(student, "ffn_layer", "mlp")),
        "block_chunks": int(_get(student, "block_chunks", 0)),
        "qkv_bias": bool(_get(student, "qkv_bias", True)),
        "proj_bias": bool(_get(student, "proj_bias", True)),
        "ffn_bias": bool(_get(student, "ffn_bias", True)),
        "num_register_tokens": int(_get(student, "num_register_tokens", 0)),
        "interpolate_antialias": bool(_get(student, "interpolate_antialias", False)),
        "interpolate_offset": float(_get(student, "interpolate_offset", 0.1)),
    }
    for key in _OVERRIDABLE:
        value = _get(student, key, None)
        if value is not None:
            kwargs[key] = int(value)
    arch = str(_get(student, "arch", "vit_large"))
    L = int(_get(student, "L", 0))
    if L > 0:
        V = int(_get(student, "V", 0))
        if V <= 1:
            raise ValueError(f"student.L={L} turns SEM on but student.V={V}; set student.V > 1")
        kwargs.update(
            L=L,
            V=V,
            temp=float(_get(student, "temp", 1.0)),
            sem_variant=str(_get(student, "sem_variant", "full")),
        )
    elif arch.removesuffix("_memeff").endswith("_sem"):
        raise ValueError(
            f"student.arch={arch} needs student.L > 0 (and student.V); "
            f"set them or use student.arch={arch.removesuffix('_sem')}"
        )
    return kwargs


def build_model_from_cfg(cfg: Any, only_teacher: bool = False) -> Any:
    """Student and teacher backbones from ``cfg.student`` -> ``(student, teacher, embed_dim)``.

    The teacher has no drop path; the student gets ``student.drop_path_rate`` and
    ``student.drop_path_uniform``. SEM is on iff ``student.L`` > 0. The pos-embed is defined for
    ``student.img_size`` (default 518, the released weights) and interpolated to the crop sizes.
    With ``only_teacher=True`` returns ``(teacher, embed_dim)`` as the reference does.
    """
    student_cfg = _get(cfg, "student", None)
    if student_cfg is None:
        raise ValueError("config has no 'student' section")
    arch = str(_get(student_cfg, "arch", "vit_large"))
    kwargs = backbone_kwargs(student_cfg)
    teacher = build_backbone(arch, **kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = build_backbone(
        arch,
        **kwargs,
        drop_path_rate=float(_get(student_cfg, "drop_path_rate", 0.0)),
        drop_path_uniform=bool(_get(student_cfg, "drop_path_uniform", False)),
    )
    return student, teacher, student.embed_dim
