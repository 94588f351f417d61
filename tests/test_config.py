"""Configuration loading: defaults, recipes, overrides, unknown keys, saving."""

import math

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from semlab.config import ConfigError, apply_scaling_rules, config_to_flat_dict, load_config, save_config


def test_defaults_have_reference_values():
    cfg = load_config()
    assert cfg.optim.base_lr == 0.004
    assert cfg.optim.scaling_rule == "sqrt_wrt_1024"
    assert cfg.dino.koleo_loss_weight == 0.1
    assert list(cfg.ibot.mask_ratio_min_max) == [0.1, 0.5]
    assert cfg.optim.clip_grad == 3.0
    assert cfg.optim.patch_embed_lr_mult == 0.2
    assert cfg.crops.local_crops_number == 8


def test_seed_recipe_values():
    cfg = load_config("train/vitl14_sem_L512")
    assert cfg.student.arch == "vit_large_sem"
    assert cfg.student.patch_size == 14
    assert cfg.student.num_register_tokens == 4
    assert (cfg.student.L, cfg.student.V, cfg.student.temp) == (512, 256, 1.0)
    assert cfg.train.batch_size_per_gpu == 64
    assert cfg.optim.base_lr == 1e-4
    assert cfg.evaluation.eval_period_iterations == 6250
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (224, 98)
    assert cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH == 125000  # the reference's schedule span
    assert cfg.train.max_iterations == 25000  # where the seed evaluates training_24999
    assert cfg.MODEL.pretrained_backbone.endswith("dinov2_vitl14_reg4_pretrain.pth")


def test_eval_recipe_uses_near_one_hot_temperature():
    cfg = load_config("eval/vitl14_L512")
    assert cfg.student.temp == 1e-5 and cfg.evaluation.sem_temp == 1e-5


def test_recipe_by_bare_name_and_path(tmp_path):
    assert load_config("demo_tiny").train.dataset_path.startswith("Demo:")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("student:\n  L: 8\n")
    assert load_config(recipe).student.L == 8


def test_overrides_win_over_recipe():
    cfg = load_config("train/vitl14_sem_L512", ["student.L=64", "train.dataset_path=Demo:split=TRAIN"])
    assert cfg.student.L == 64
    assert cfg.train.dataset_path == "Demo:split=TRAIN"


def test_unknown_override_names_closest_key():
    with pytest.raises(ConfigError, match=r"student\.Ll.*student\.L"):
        load_config(None, ["student.Ll=3"])


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.base_lrr.*optim\.base_lr"):
        load_config(recipe)


def test_missing_recipe_lists_packaged_ones():
    with pytest.raises(ConfigError, match="train/vitl14_sem_L512"):
        load_config("train/nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["student.L"])


def test_struct_mode_blocks_typos_after_loading():
    cfg = load_config()
    with pytest.raises(ConfigAttributeError):
        cfg.student.not_a_key = 3


def test_scaling_rule_sqrt_wrt_1024():
    cfg = load_config("train/vitl14_sem_L512")
    lr = apply_scaling_rules(cfg, world_size=4)
    assert math.isclose(lr, 1e-4 * math.sqrt(256 / 1024))
    assert cfg.optim.lr == lr


def test_save_config_round_trip(tmp_path):
    cfg = load_config("demo_tiny", ["student.L=12"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = OmegaConf.load(path)
    assert again.student.L == 12
    assert not list(path.parent.glob(".*tmp"))


def test_flat_dict_for_tracking():
    flat = config_to_flat_dict(load_config("train/vitl14_sem_L512"))
    assert flat["student.L"] == 512 and flat["student.temp"] == 1.0
    assert flat["crops.global_crops_scale"] == "[0.32, 1.0]"


@pytest.mark.parametrize("key", ["MODEL.WEIGHTS", "student.pretrained_weights"])
def test_retired_weight_keys_point_to_pretrained_backbone(key):
    assert load_config("train/demo_tiny")[key.split(".")[0]][key.split(".")[1]] == ""  # kept, empty
    with pytest.raises(ConfigError, match=rf"{key}=w\.pth .*MODEL\.pretrained_backbone=w\.pth"):
        load_config("train/demo_tiny", [f"{key}=w.pth"])


def test_sem_settings_errors_name_the_key():
    from semlab.config.checks import check_sem

    with pytest.raises(ConfigError, match=r"student\.V=0"):
        check_sem(L=8, V=0)
    with pytest.raises(ConfigError, match=r"student\.temp=0"):
        check_sem(temp=0)
    with pytest.raises(ConfigError, match=r"evaluation\.sem_temp=-1"):
        load_config("train/demo_tiny", ["evaluation.sem_temp=-1"])
    with pytest.raises(ConfigError, match=r"student\.arch=vit_tiny_sem needs L > 0"):
        check_sem(L=0, arch="vit_tiny_sem")
