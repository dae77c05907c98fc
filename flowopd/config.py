"""Configs: dataclasses <- YAML file <- ``--key=value`` overrides.

Unknown keys are errors that name the closest valid key; values are checked
against the field's type. ``ConfigError`` carries a message meant for users
(the CLI prints it and exits with status 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError

# The YAML configs shipped with the package (the repository's configs/ is a link to this folder).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError, ValueError):
    """Bad user input in a config: the message names what is wrong."""


def _closest(key: str, valid) -> str:
    m = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _number(name: str, value, tp):
    """value as an int (integral floats and numeric strings too) or a float; booleans are refused."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{name}: expected {what}, got {value!r}")


def _coerce(name: str, value, tp):
    """Check/convert value to the annotated type tp, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        out = [_coerce(name, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        return _number(name, value, tp)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['key=value', '--other-key=value'] -> {'key': 'value', 'other_key': 'value'} (values unconverted)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        k, v = item.lstrip("-").split("=", 1)
        out[k.replace("-", "_")] = v
    return out


def build(cls, data: dict | None = None, overrides: list[str] | None = None):
    """Make a config dataclass from a mapping plus 'key=value' overrides; validate it."""
    data = {**(data or {}), **parse_overrides(overrides or [])}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{k}'{_closest(k, fields)}")
        kwargs[k] = _coerce(k, v, hints[k])
    cfg = cls(**kwargs)
    check = getattr(cfg, "validate", None)
    if check:
        check()
    return cfg


def packaged_configs() -> list[str]:
    """The packaged configs, as names relative to PACKAGED_CONFIGS (toy_grpo_text.yaml, accelerate/ddp.yaml)."""
    return sorted(str(f.relative_to(PACKAGED_CONFIGS)) for f in PACKAGED_CONFIGS.rglob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """A config file: `path` itself when it exists; otherwise, for a relative path, the packaged config
    of that name (toy_grpo_text.yaml, or configs/toy_grpo_text.yaml as the docs write it), so that the
    documented commands work from any directory with an installed package. Neither: a ConfigError
    that lists the packaged configs."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) and len(p.parts) > 1 else p
        for cand in (PACKAGED_CONFIGS / rel, PACKAGED_CONFIGS / p):
            if cand.is_file():
                return cand
    raise ConfigError(f"config file not found: {p} (neither a file nor a packaged config; the packaged "
                      f"configs are {', '.join(packaged_configs())})")


def load_yaml(path: str | Path) -> dict:
    p = resolve_config(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value")
    return data


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    return build(cls, load_yaml(path) if path else {}, overrides)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
