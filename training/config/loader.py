"""YAML recipe + `key.path=value` overrides -> TrainConfig, with every type problem collected.

Precedence (lowest to highest): the dataclass defaults (sections.py), the recipe YAML
(`--config configs/NAME.yaml`), then overrides (values parsed as YAML, so `optim.lr=3e-4`,
`eval.memory_task_segments=[2,4]` and `model.init_from=null` work)."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from training.config.errors import ConfigError
from training.config.gate import validate
from training.config.sections import TrainConfig


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in inner)
        return f"{name} | null" if len(inner) < len(args) else name
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not ...)}]"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Return `value` converted to `tp` (int -> float only), appending problems when it is not."""
    origin = typing.get_origin(tp)
    bad = f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, problems) if len(inner) == 1 else value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(bad)
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(bad)
        return value
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return value
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            problems.append(bad)
        return value
    raise TypeError(f"config type {tp!r} of {where} is not supported by the loader")


def _build(cls: type, raw: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key (valid: {', '.join(names)})")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}{k}", problems)
              for k, v in raw.items() if k in names}
    n_before = len(problems)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if len(problems) == n_before:
            problems.append(f"{where or 'config'}: {e}")
        return cls()
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {} if child is None else child
        if not isinstance(child, dict):
            raise ConfigError([f"override {dotted}: {p} is not a section"])
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value, e.g. optim.lr=3e-4")
            continue
        try:
            parsed.append((key, yaml.safe_load(text) if text != "" else ""))
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e})")
    return parsed, problems


def _known_paths(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.add(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _known_paths(hints[f.name], f"{path}.")
    return out


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = (),
                world_size: Optional[int] = None, accelerator=None) -> TrainConfig:
    """Defaults < recipe YAML < dotted overrides, through the gate (gate.validate); raises
    ConfigError listing every problem. `world_size`: the ranks a training run starts with (its
    batch must split over them); `accelerator`: DeepSpeed's accelerator the run trains on (its
    precisions). Both None for commands that do not train (tokenizer, config check, export,
    evaluate), which skip those checks."""
    problems: list[str] = []
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"--config: {path} is not a file (recipes: "
                               f"{', '.join(sorted(str(c) for c in Path('configs').glob('*.yaml')))})"])
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"--config: {path} is not valid YAML ({e})"])
        if not isinstance(raw, dict):
            raise ConfigError([f"--config: {path} must hold a mapping of sections"])
    parsed, problems = parse_overrides(list(overrides))
    known = _known_paths(TrainConfig)
    for key, value in parsed:
        # Keys inside free-form dicts (model.backbone.*, deepspeed.extra.*) are open-ended.
        open_dict = any(key.startswith(f"{p}.") for p in ("model.backbone", "deepspeed.extra"))
        if key not in known and not open_dict:
            problems.append(f"override {key}: unknown key")
            continue
        try:
            _set_dotted(raw, key, value)
        except ConfigError as e:
            problems += e.problems
    cfg, type_problems, broken = _build_train_config(raw)
    problems += type_problems
    # Sections whose fields already failed the type checks are not range-checked again.
    problems += validate(cfg, world_size, accelerator=accelerator, skip=broken)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_saved_config(path: str | os.PathLike) -> TrainConfig:
    """A run's saved config.yaml as written, type-checked but not validated: the files it names
    (data, tokenizer) may live on another machine, and it was validated when the run started."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"{path}: cannot read the run's config ({e})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: must hold a mapping of sections"])
    cfg, problems, _ = _build_train_config(raw)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return cfg


def _build_train_config(raw: dict) -> tuple[TrainConfig, list[str], set[str]]:
    """TrainConfig from a mapping of sections: the config, its type problems, and the names of
    the sections those problems are in."""
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    problems = [f"{key}: unknown key (valid: {', '.join(names)})" for key in raw if key not in names]
    sections, broken = {}, set()
    for name in names:
        found: list[str] = []
        sections[name] = _check_value(raw.get(name, {}), hints[name], name, found)
        if found:
            broken.add(name)
            problems += found
    return TrainConfig(**sections), problems, broken
