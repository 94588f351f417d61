"""The seed recipe `train/vitl14_sem_L512` resolves to the reference's own values.

`tests/data/recipe_vitl14_sem_L512.tsv` is the reference's resolved training config (its default
config with the seed's `vitl14_sem_L512.yaml` on top), `schedules_vitl14_sem_L512.tsv` its
schedule values for 4 GPUs x 64 images, `eval_vitl14_L512.tsv` its evaluation config; see
`tests/data/README.md`. Every difference must be listed below with its reason (and in
docs/method.md); anything else fails.
"""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from semlab.config import apply_scaling_rules, load_config
from semlab.train.loop import checkpoint_period
from semlab.train.schedules import build_schedules

DATA = Path(__file__).parent / "data"

# Reference keys that semlab keeps under another name (same value expected).
RENAMED = {
    # semlab keeps every backbone-shape knob under student.*; the value (518) must match.
    "MODEL.img_size": "student.img_size",
}
# Reference keys whose value semlab deliberately does not reproduce (docs/method.md, "Differences").
ALLOWED_PREFIXES = {
    # fp16 params + fp16 reductions + a grad scaler under FSDP1 in the reference; semlab runs bf16
    # autocast (FSDP2 MixedPrecisionPolicy on GPU, fp32 gradient reduction) and needs no scaler.
    "compute_precision.",
}


def read_tsv(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def parse(text: str):
    """A TSV cell as a Python value: 'True', '1e-05', '[0.1, 0.5]' -> bool, float, list; else str."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def same(ours, ref) -> bool:
    if isinstance(ref, bool) or isinstance(ours, bool):
        return ours is ref or (isinstance(ours, bool) and isinstance(ref, bool) and ours == ref)
    if isinstance(ref, (int, float)) and isinstance(ours, (int, float)):
        return math.isclose(float(ours), float(ref), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(ref, list) and isinstance(ours, list):
        return len(ours) == len(ref) and all(same(a, b) for a, b in zip(ours, ref))
    if ref is None or ref == "":
        return ours in (None, "")
    return ours == ref


@pytest.fixture
def recipe(monkeypatch):
    # The recipe's site paths follow the reference's layout with its placeholders as env variables.
    monkeypatch.setenv("SEMLAB_ROOT", "<ROOT_PATH>")
    monkeypatch.setenv("SEMLAB_DATASET_PATH", "<DATASET_PATH>")
    cfg = load_config("train/vitl14_sem_L512")
    return OmegaConf.to_container(cfg, resolve=True), cfg


def rounding(cell: str) -> float:
    """Half a unit of the cell's last printed digit: the TSV prints fixed-point values (teacher temp,
    momentum) with 6-8 decimals, so 0.0400008 is written 0.040001; scientific cells carry 7 digits."""
    if "e" in cell.lower():
        return 0.0
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return 0.5 * 10.0**-decimals


def lookup(container: dict, dotted: str):
    node = container
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_every_reference_key_has_the_reference_value(recipe):
    container, _ = recipe
    differences, allowed = [], []
    for row in read_tsv("recipe_vitl14_sem_L512.tsv"):
        key, ref = row["key"], parse(row["value"])
        if any(key.startswith(p) for p in ALLOWED_PREFIXES):
            allowed.append(key)
            continue
        ours_key = RENAMED.get(key, key)
        try:
            ours = lookup(container, ours_key)
        except KeyError:
            differences.append(f"{key}: missing in semlab (looked for {ours_key})")
            continue
        if not same(ours, ref):
            differences.append(f"{key}: reference {ref!r}, semlab {ours!r}")
    assert not differences, "recipe differs from the reference:\n" + "\n".join(differences)
    assert allowed, "the allow-list matched nothing: drop it"


def test_recipe_stops_at_the_seeds_evaluation_point(recipe):
    _, cfg = recipe
    assert int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH) == 125_000  # schedule span
    assert int(cfg.train.max_iterations) == 25_000  # the seed evaluates training_24999


def test_recipe_schedules_match_the_reference_for_4_x_64(recipe):
    _, cfg = recipe
    apply_scaling_rules(cfg, world_size=4)
    s = build_schedules(cfg)
    rows = read_tsv("schedules_vitl14_sem_L512.tsv")
    assert len(rows) >= 10
    for row in rows:
        it = int(row["iteration"])
        ours = {
            "lr": s.lr[it],
            "last_layer_lr": s.last_layer_lr[it],
            "weight_decay": s.wd[it],
            "teacher_momentum": s.momentum[it],
            "teacher_temp": s.teacher_temp[it],
        }
        for name, value in ours.items():
            ref = float(row[name])
            tol = max(1e-6 * abs(ref), rounding(row[name]), 1e-15)
            assert abs(value - ref) <= tol, f"{name} at it {it}: semlab {value!r}, reference {row[name]}"


def test_recipe_checkpoints_every_3750_iterations_and_keeps_3(recipe):
    _, cfg = recipe
    assert checkpoint_period(cfg) == 3 * 1250 == 3750
    assert int(cfg.train.max_to_keep) == 3
    # saveckp_freq keeps the reference's value but, as in the reference, does not set the period
    cfg.train.saveckp_freq = 1
    assert checkpoint_period(cfg) == 3750


def test_eval_recipe_matches_the_reference_eval_config():
    cfg = OmegaConf.to_container(load_config("eval/vitl14_L512"), resolve=True)
    differences = []
    for row in read_tsv("eval_vitl14_L512.tsv"):
        key, ref = row["key"], parse(row["value"])
        ours = lookup(cfg, key)
        if not same(ours, ref):
            differences.append(f"{key}: reference {ref!r}, semlab {ours!r}")
    assert not differences, "\n".join(differences)
    assert cfg["evaluation"]["sem_temp"] == pytest.approx(1e-5)
