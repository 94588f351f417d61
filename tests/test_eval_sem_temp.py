"""Evaluation commands read SEM at the evaluation recipe's tau (1e-5) unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import import_experiment, write_teacher_checkpoint

from semlab.config import load_config, save_config
from semlab.eval.sem_temp import resolve_eval_sem_temp


def training_run_config(tmp_path: Path) -> Path:
    """A training run's config.yaml whose evaluation.sem_temp is the training tau (1)."""
    cfg = load_config("train/demo_tiny", ["evaluation.sem_temp=1.0"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return path


def test_eval_recipe_temperature_wins_over_a_training_config(tmp_path):
    path = training_run_config(tmp_path)
    cfg = load_config(str(path))
    assert cfg.student.temp == 1.0 and cfg.evaluation.sem_temp == 1.0
    line = resolve_eval_sem_temp(cfg)
    assert cfg.evaluation.sem_temp == pytest.approx(1e-5)
    assert line == "SEM temperature tau = 1e-05 (the evaluation recipe eval/vitl14_L512)"


def test_the_user_can_say_otherwise(tmp_path):
    cfg = load_config(str(training_run_config(tmp_path)))
    assert "(--sem-temp)" in resolve_eval_sem_temp(cfg, cli_value=0.1)
    assert cfg.evaluation.sem_temp == pytest.approx(0.1)
    cfg = load_config(str(training_run_config(tmp_path)), ["evaluation.sem_temp=0.5"])
    assert "override" in resolve_eval_sem_temp(cfg, overrides=["evaluation.sem_temp=0.5"])
    assert cfg.evaluation.sem_temp == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_eval_sem_temp(cfg, cli_value=0.0)


def test_knn_command_reads_cls_through_sem_at_the_eval_temperature(tmp_path, capsys):
    """knn.py handed a training config.yaml: the backbone's SEM (and so its CLS output) runs at 1e-5."""
    from semlab.models import build_model_from_cfg

    config = training_run_config(tmp_path)
    torch.manual_seed(0)
    teacher, _ = build_model_from_cfg(load_config(str(config)), only_teacher=True)
    ckpt = write_teacher_checkpoint(tmp_path / "eval" / "training_9" / "teacher_checkpoint.pth", teacher)
    cli = import_experiment("knn")
    seen = {}
    real = cli.build_eval_backbone

    def spy(cfg, weights):
        backbone = real(cfg, weights)
        seen["tau"] = backbone.sem_temp
        return backbone

    cli.build_eval_backbone = spy
    try:
        args = ["--config-file", str(config), "--pretrained-weights", str(ckpt),
                "--output-dir", str(tmp_path), "--train-dataset", "Demo:split=TRAIN:n_per_class=2",
                "--val-dataset", "Demo:split=VAL:n_per_class=1", "knn.nb_knn=[1]"]
        assert cli.main(args) == 0
    finally:
        cli.build_eval_backbone = real
    assert seen["tau"] == pytest.approx(1e-5)
    assert "SEM temperature tau = 1e-05 (the evaluation recipe eval/vitl14_L512)" in capsys.readouterr().out
    assert json.loads((tmp_path / "knn.json").read_text())["sem_temp"] == pytest.approx(1e-5)
