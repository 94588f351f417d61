"""Configuration: OmegaConf defaults, recipes and command-line overrides.

A run's configuration is built in three layers, later ones winning:

    ssl_default.yaml  <-  recipe (train/*.yaml, eval/*.yaml or any YAML path)  <-  dotlist overrides

Every key a recipe or override sets must already exist in the defaults; a typo is a
``ConfigError`` that names the closest valid keys instead of silently adding a new one.
"""

from semlab.config.loading import (
    ConfigError,
    apply_scaling_rules,
    config_from_container,
    config_to_flat_dict,
    config_yaml,
    load_config,
    recipe_path,
    resolved_copy,
    save_config,
)

__all__ = [
    "ConfigError",
    "apply_scaling_rules",
    "config_from_container",
    "config_to_flat_dict",
    "config_yaml",
    "load_config",
    "recipe_path",
    "resolved_copy",
    "save_config",
]
