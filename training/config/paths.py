"""Where the repository's own config files live (recipes and DeepSpeed templates)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
