"""Run configuration: one dataclass per concern, loaded from YAML plus dotted overrides, checked
by one gate that lists every problem (exit 2 for the commands).

  sections.py          the recipe's sections (run, model, optim, eval, ...), each checking itself
  batch.py             the batch section and how a world size splits it
  deepspeed_config.py  the deepspeed section and the DeepSpeed config dict built from the recipe
  loader.py            YAML + `key.path=value` overrides -> TrainConfig, type problems collected
  gate.py              the one gate: sections, world size, accelerator, files, cross-section
  reference.py         the README's config reference, generated from the sections' docs
  __main__.py          `python -m training.config --reference | --check RECIPE [--world-size N]`
"""

from training.config.batch import BatchConfig
from training.config.deepspeed_config import (DS_KEYS_OWNED_BY_RECIPE, DeepSpeedConfig,
                                              template_problems)
from training.config.errors import ConfigError
from training.config.gate import precision_problems, validate
from training.config.loader import load_config, load_saved_config, parse_overrides
from training.config.paths import DS_CONFIG_DIR, REPO_ROOT
from training.config.reference import config_reference_markdown
from training.config.sections import (INIT_WEIGHTS, CheckpointConfig, DistributedConfig,
                                      EvalConfig, GuardConfig, LoggingConfig, ModelConfig,
                                      OptimConfig, RunConfig, TrainConfig)

__all__ = [
    "BatchConfig", "CheckpointConfig", "ConfigError", "DS_CONFIG_DIR", "DS_KEYS_OWNED_BY_RECIPE",
    "DeepSpeedConfig", "DistributedConfig", "EvalConfig", "GuardConfig", "INIT_WEIGHTS",
    "LoggingConfig", "ModelConfig", "OptimConfig", "REPO_ROOT", "RunConfig", "TrainConfig",
    "config_reference_markdown", "load_config", "load_saved_config", "parse_overrides",
    "precision_problems", "template_problems", "validate",
]
