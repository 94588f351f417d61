"""Shared fixtures: the tiny ViTs the model, checkpoint and DLC tests build.

``build_tiny_vit(seed=None, **overrides)`` is ``vit_tiny`` (SEM when ``L`` > 0) at a size that runs in
milliseconds on a CPU, in eval mode; ``seed`` seeds torch first, so the weights are reproducible.
The ``tiny_vit`` fixture hands the same builder to a test.

Markers (pyproject.toml): ``slow`` for every test that starts processes, Ray or MLflow or takes more
than about a second, ``ray`` / ``mlflow`` for those that start a real Ray cluster / MLflow store;
``pytest -m "not slow"`` is the quick loop, plain ``pytest`` runs everything.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from semlab.models import DinoVisionTransformer, vit_tiny

TINY_VIT: dict[str, Any] = dict(
    embed_dim=32, depth=4, num_heads=2, img_size=56, num_register_tokens=2, init_values=1e-5
)


def build_tiny_vit(seed: int | None = None, **overrides: Any) -> DinoVisionTransformer:
    """A tiny ``vit_tiny`` (``TINY_VIT`` with ``overrides``) in eval mode; seeded when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    return vit_tiny(**{**TINY_VIT, **overrides}).eval()


@pytest.fixture
def tiny_vit() -> Callable[..., DinoVisionTransformer]:
    return build_tiny_vit


def import_experiment(name: str) -> ModuleType:
    """The entry point ``experiments/<name>.py`` as a module (``knn``, ``linear``, ``extract_dlc``...)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def write_teacher_checkpoint(path: Path, backbone: torch.nn.Module) -> Path:
    """``backbone`` saved as a teacher eval checkpoint in semlab's layout (``{"teacher": backbone.*}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts a Ray cluster or an MLflow store is slow, whether or not it says so."""
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("mlflow"):
            item.add_marker(pytest.mark.slow)
