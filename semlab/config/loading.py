"""Load, validate, override and save semlab configurations."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from semlab.utils.atomic import atomic_write_text
from semlab.utils.redact import redact_tree

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULTS_NAME = "ssl_default"


class ConfigError(ValueError):
    """A configuration file, recipe name or override is wrong; the message says how to fix it."""


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a recipe given as a file path or as a packaged name.

    ``"configs/x.yaml"`` (an existing file) is taken as is; ``"train/demo_tiny"``,
    ``"train/demo_tiny.yaml"`` and ``"demo_tiny"`` are looked up inside ``semlab/config``
    (in ``train/`` then ``eval/`` for a bare name).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = str(name_or_path).removesuffix(".yaml")
    candidates = [CONFIG_DIR / f"{stem}.yaml"]
    if "/" not in stem:
        candidates += [CONFIG_DIR / "train" / f"{stem}.yaml", CONFIG_DIR / "eval" / f"{stem}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(
        str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.glob("*/*.yaml")
    )
    raise ConfigError(
        f"config file '{name_or_path}' not found: it is neither an existing file nor a packaged recipe. "
        f"Packaged recipes: {', '.join(known)}"
    )


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf and section of a config (lists are leaves)."""
    keys: list[str] = []
    if isinstance(cfg, Mapping | DictConfig):
        for key in cfg:
            path = f"{prefix}{key}"
            keys.append(path)
            value = cfg[key] if not isinstance(cfg, DictConfig) else cfg._get_node(key)
            if isinstance(value, DictConfig | Mapping):
                keys.extend(_flat_keys(value, f"{path}."))
    return keys


def _open_sections(defaults: DictConfig) -> set[str]:
    """Sections whose contents are free-form (empty dicts in the defaults, e.g. ``mlflow.tags``)."""
    open_ = set()
    for key in _flat_keys(defaults):
        node = OmegaConf.select(defaults, key)
        if isinstance(node, DictConfig) and len(node) == 0:
            open_.add(key)
    return open_


def _check_known_keys(candidate: DictConfig | dict, defaults: DictConfig, source: str) -> None:
    valid = set(_flat_keys(defaults))
    open_sections = _open_sections(defaults)
    for key in _flat_keys(candidate):
        if key in valid or any(key.startswith(f"{s}.") for s in open_sections):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
        leaf = key.rsplit(".", 1)[-1]
        close += [k for k in sorted(valid) if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _check_value_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """A key whose default is a number or a bool must not hold text (``student.L=abc``); interpolations
    are left alone."""
    for key in _flat_keys(defaults):
        default = OmegaConf.select(defaults, key)
        if default is None or isinstance(default, DictConfig | ListConfig | str):
            continue
        section, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, section) if section else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        if OmegaConf.is_interpolation(parent, leaf):
            continue  # an interpolation (${oc.env:...}) is checked where it is resolved
        value = parent[leaf]
        if isinstance(value, str):
            kind = "true or false" if isinstance(default, bool) else (
                "an integer" if isinstance(default, int) else "a number")
            raise ConfigError(f"{key}={value!r}: expected {kind} (default {default})")


def _parse_dotlist(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"bad override '{item}': overrides are written key=value, e.g. student.L=512"
            )
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:  # omegaconf raises several grammar errors
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from exc


def load_config(
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    defaults: str = DEFAULTS_NAME,
) -> DictConfig:
    """Build a run's configuration: defaults <- recipe <- ``key=value`` overrides.

    Returns a struct-mode ``DictConfig`` (reading or setting an unknown key raises).
    Raises ``ConfigError`` for a missing recipe, an unknown key, a malformed override, or a value
    that :func:`semlab.config.checks.check_config` refuses (SEM settings, retired weight keys).
    """
    base = OmegaConf.load(CONFIG_DIR / f"{defaults}.yaml")
    layers: list[DictConfig] = [base]
    if config_file:
        path = recipe_path(config_file)
        try:
            recipe = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"cannot read config file '{path}': {exc}") from exc
        if not isinstance(recipe, DictConfig):
            kind = type(recipe).__name__
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {kind}")
        _check_known_keys(recipe, base, f"config file '{path}'")
        layers.append(recipe)
    dotlist = _parse_dotlist(overrides)
    _check_known_keys(dotlist, base, "command-line overrides")
    layers.append(dotlist)
    cfg = OmegaConf.merge(*layers)
    assert isinstance(cfg, DictConfig)
    _check_value_types(cfg, base)
    OmegaConf.set_struct(cfg, True)
    from semlab.config.checks import check_config

    check_config(cfg)
    return cfg


def config_from_container(container: dict[str, Any]) -> DictConfig:
    """The struct-mode DictConfig of a plain ``OmegaConf.to_container(cfg, resolve=True)`` dict (the
    form a config takes where a framework needs plain data, e.g. a Ray Tune ``param_space``)."""
    cfg = OmegaConf.create(container)
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolved_copy(cfg: DictConfig) -> DictConfig:
    """A struct-mode deep copy of ``cfg`` with every interpolation resolved: what a Ray worker gets
    (pickled as a DictConfig, so the config keeps its type on the way)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(copy, True)
    return copy


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> float:
    """Set ``optim.lr`` from ``optim.base_lr`` for the global batch size and return it.

    ``sqrt_wrt_1024``: lr = base_lr * sqrt(batch_size_per_gpu * world_size / 1024)
    (base_lr is defined for a batch of 1024 images, as in DINOv2).
    """
    rule = cfg.optim.scaling_rule
    if rule != "sqrt_wrt_1024":
        raise ConfigError(f"unknown optim.scaling_rule '{rule}'; semlab supports 'sqrt_wrt_1024'")
    global_batch = cfg.train.batch_size_per_gpu * world_size
    cfg.optim.lr = float(cfg.optim.base_lr) * math.sqrt(global_batch / 1024.0)
    return cfg.optim.lr


def config_to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """Flatten a resolved config into ``{"student.L": 512, ...}`` (lists become strings)."""
    flat: dict[str, Any] = {}
    container = OmegaConf.to_container(cfg, resolve=True)

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node) if isinstance(node, list | ListConfig) else node

    walk(container, "")
    return flat


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML with credentials redacted (:mod:`semlab.utils.redact`): the only
    form in which a config is written to disk or MLflow. Secrets stay in the process's config."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_tree(OmegaConf.to_container(cfg, resolve=True))))


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved, credential-free config (:func:`config_yaml`) atomically (temp + rename)."""
    return atomic_write_text(path, config_yaml(cfg))
