"""The config reference (README's "Configuration reference"), generated from the sections' docs."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from training.config.loader import _type_name
from training.config.sections import TrainConfig


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _reference_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], f"{prefix}{f.name}"
        (item_tp, *_) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(tp):
            rows += _reference_rows(tp, f"{path}.")
            continue
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item_tp):
            rows.append(f"| `{path}` | list | `[]` | {f.metadata.get('doc', '')}; each item: |")
            rows += _reference_rows(item_tp, f"{path}[].")
            continue
        text = f.metadata.get("doc", "")
        if not text:
            raise ValueError(f"config field {path} has no doc text")
        default = _default_of(f)
        default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        type_text = _type_name(tp).replace("|", "\\|")
        rows.append(f"| `{path}` | {type_text} | `{json.dumps(default)}` | {text} |")
    return rows


def config_reference_markdown() -> str:
    """Markdown tables of every config key (type, default, one-line doc), one per section."""
    lines = ["Precedence: dataclass defaults < recipe YAML (`--config`) < `key.path=value` "
             "command-line overrides.", ""]
    hints = typing.get_type_hints(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        lines += [f"### `{section.name}`", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        lines += _reference_rows(hints[section.name], f"{section.name}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
