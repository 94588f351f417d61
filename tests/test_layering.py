"""The import direction of docs/architecture.md, read from the source (imports inside functions too).

- ``models`` and ``losses`` import nothing above them (only ``config``, ``utils``, ``models``,
  ``losses``), and neither ``ray`` nor ``mlflow``;
- ``data`` may use Ray Data, but never ``ray.train``, ``ray.tune``, ``ray.init`` or Ray's private
  modules, and nothing above it;
- ``train`` never imports ``eval``, ``orchestration``, ``tracking``, ``ray`` or ``mlflow``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SEMLAB = Path(__file__).resolve().parents[1] / "semlab"


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, plus every dotted ``ray.<name>`` it uses as an attribute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray":
            names.add(f"ray.{node.attr}")
    return names


def layer_imports(layer: str) -> dict[str, set[str]]:
    files = sorted((SEMLAB / layer).rglob("*.py"))
    assert files, f"no modules under semlab/{layer}"
    return {str(f.relative_to(SEMLAB.parent)): imported_names(f) for f in files}


def offending(layer: str, forbidden) -> list[str]:
    return [f"{path}: {name}" for path, names in layer_imports(layer).items() for name in sorted(names)
            if forbidden(name)]


def _top(name: str) -> str:
    return name.split(".")[0]


def _semlab_layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "semlab" and len(parts) > 1 else None


@pytest.mark.parametrize("layer", ["models", "losses"])
def test_models_and_losses_import_nothing_above_them(layer):
    allowed = {"config", "utils", "models", "losses"}
    assert offending(layer, lambda n: _top(n) in ("ray", "mlflow")
                     or (_semlab_layer(n) is not None and _semlab_layer(n) not in allowed)) == []


def test_data_uses_ray_data_only_and_never_starts_ray():
    def forbidden(name: str) -> bool:
        if _top(name) == "mlflow":
            return True
        if _top(name) == "ray":
            return name.split(".")[1:2] in (["train"], ["tune"], ["init"]) or "._" in name
        return _semlab_layer(name) in ("train", "eval", "tracking", "orchestration")

    assert offending("data", forbidden) == []


def test_train_knows_nothing_of_eval_orchestration_tracking_ray_or_mlflow():
    assert offending("train", lambda n: _top(n) in ("ray", "mlflow")
                     or _semlab_layer(n) in ("eval", "orchestration", "tracking")) == []


def test_the_checker_sees_lazy_imports_and_ray_attributes(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray\n    from semlab.eval import knn\n    ray.init()\n")
    assert {"ray", "semlab.eval", "semlab.eval.knn", "ray.init"} <= imported_names(module)
