"""Config dataclass fields that carry their CLI help text and their valid range (the CLI is generated from them).

A config class calls `check_options(self)` in `__post_init__`, so a bad value fails with one line naming the
option before anything is loaded, whether it came from the command line or from Python.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from enum import Enum
from typing import Any

from .errors import UserError, note

INT_MAX = 2**31 - 1  # no count, length or seed r2q takes is larger; bigger values are typos


# attention kernels r2q takes for --attn-implementation ("" = what the model's config says: transformers' default,
# sdpa, unless config.json names one); the forms of the mask each takes: see tokens.shared_mask
ATTENTION = ("", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
_FLASH_PACKAGE = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface)")}


def attention_option() -> Any:
    return option("", "Attention kernel: sdpa, eager, flex_attention (training with it needs a GPU) or "
                  "flash_attention_2 / _3 (a GPU and flash-attn; pairs run unshared)", choices=ATTENTION,
                  shown="the model's")


def missing_package(impl: str) -> str | None:
    """The package a flash kernel needs when it is not installed (None when it is, or for any other kernel)."""
    if impl in _FLASH_PACKAGE:
        import importlib.util

        module, name = _FLASH_PACKAGE[impl]
        if importlib.util.find_spec(module) is None:
            return name
    return None


def check_attention(impl: str) -> None:
    """--attn-implementation: one of ATTENTION, and a flash kernel's package installed: said before anything loads
    (transformers says it deep in a load)."""
    if impl not in ATTENTION:
        raise UserError(f"--attn-implementation must be one of {', '.join(a or repr(a) for a in ATTENTION)}; got "
                        f"{impl!r}")
    if name := missing_package(impl):
        raise UserError(f"--attn-implementation {impl} needs the {name} package (and a CUDA GPU), which is not "
                        "installed: install it, or use sdpa")


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, choices: tuple[str, ...] | None = None, shown: str | None = None,
           positional: bool = False) -> Any:
    """A dataclass field with a default, the help line `r2q` shows for its --option and its valid values:
    ge / gt / le bound a number (ints are also at most INT_MAX, floats finite), choices lists the strings.
    shown: what --help prints as the default, where the value itself would mislead. positional: a command-line
    argument, not an --option (required when its default is "")."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "shown": shown, "positional": positional}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(cfg: Any) -> None:
    """Raise UserError for the first field whose value is of the wrong type or lies outside its declared range. An
    int is a float; integral floats become ints (as in a config file); anything else is refused, not coerced
    (num_beams="4", share_prefix="false": Python would take the string as true)."""
    for f in dataclasses.fields(cfg):
        want = field_type(f)
        v = _coerced(getattr(cfg, f.name), want)
        setattr(cfg, f.name, v)
        if not (v is None and "None" in str(f.type)) and not _is_a(v, want):
            raise UserError(f"{flag(f.name)} must be {_TYPE_NAMES[want]}; got {type(v).__name__} {v!r}"[:300])
        problem = _problem(v, f.metadata)
        if problem:
            raise UserError(f"{flag(f.name)} {problem}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerced(v: Any, want: type) -> Any:
    """An int where a float is wanted becomes a float, an integral float where an int is wanted an int; all else
    stays as it is (and is then checked with _is_a)."""
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if want is int and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _is_a(v: Any, want: type) -> bool:
    return isinstance(v, want) and (want is bool or not isinstance(v, bool))


def check_prompt_fits(max_length: int, max_prompt_length: int) -> None:
    """--max-prompt-length must leave room for a completion within --max-length (train, sft, credit)."""
    if max_prompt_length >= max_length:
        raise UserError(f"--max-prompt-length ({max_prompt_length}) must be less than --max-length "
                        f"({max_length}), to leave room for the completion")


def _problem(v: Any, meta: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        choices = meta.get("choices")
        if choices and v not in choices:
            return f"must be one of {', '.join(c or repr(c) for c in choices)}; got {v!r}"
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number; got {v}"
    if isinstance(v, int) and abs(v) > INT_MAX:
        return f"must be at most {INT_MAX:,} in size; got {v}"
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and v < ge:
        return f"must be at least {ge:g}; got {v:g}"
    if gt is not None and v <= gt:
        return f"must be greater than {gt:g}; got {v:g}"
    if le is not None and v > le:
        return f"must be at most {le:g}; got {v:g}"
    return None


# keys a run record (r2q_config.json) holds besides the options: accepted in a config file and not applied
RECORD_ONLY = {"mode", "inputs"}


def read_config_file(path: str, cls: type) -> dict[str, Any]:
    """The options a YAML or JSON config file sets for config dataclass `cls`: keys are option names (`max_length`
    or `max-length`), values of the option's type. A run's r2q_config.json is a config file too (its record-only
    keys are skipped). An unknown key, a wrong type or an unreadable file is a UserError naming it."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # (a BOM, as some editors write, is no part of the text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        return {}  # an empty file sets nothing (YAML's reading of it; JSON would call it malformed)
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_keys_loader(yaml))
        else:
            data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise UserError(f"--config {path}: the key {e.args[0]!r} is given twice") from None
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: the parser's message says where
        raise UserError(f"--config {path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}"
                        f" ({' '.join(str(e).split())[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    spelled: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in spelled:
            raise UserError(f"--config {path}: {spelled[name]!r} and {key!r} are the same option, given twice")
        spelled[name] = key
        if name in RECORD_ONLY:
            continue
        if name == "trust_remote_code" and "inputs" in data:  # a run record (of r2q < 0.2 still held this key)
            if value:
                note(f"--config {path}: a run record's trust_remote_code is not applied (it would run the model "
                     "directory's code); give --trust-remote-code yourself")
            continue
        if name not in fields:
            raise UserError(f"--config {path}: unknown option {key!r} (not an option of this command)")
        out[name] = _typed(value, fields[name], path, key)
    return out


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict:
    """json's object_pairs_hook: a mapping that refuses a key given twice (json.loads keeps the last silently)."""
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _unique_keys_loader(yaml):
    """A safe YAML loader whose mappings refuse a key given twice (yaml.safe_load keeps the last silently)."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # merge keys (<<) are not keys of their own, and a key may override one they bring in
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
            for i, k in enumerate(keys):
                if k in keys[:i]:
                    raise _DuplicateKey(k)
            return super().construct_mapping(node, deep=deep)

    return Loader


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a config field's values (an Enum option's is its value's string; `float | None`: float)."""
    if isinstance(f.default, Enum):
        return str
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool}[name.replace(" | None", "")]


# what YAML 1.1 (PyYAML) reads as a string though it is meant as a number: an exponent without a decimal point
_YAML_EXPONENT = re.compile(r"[-+]?(\d+|\d+\.\d*|\.\d+)[eE][-+]?\d+")


def _typed(value: Any, f: dataclasses.Field, path: str, key: str) -> Any:
    want = field_type(f)  # (an Enum's string: the config turns it into the Enum)
    if want is float and isinstance(value, str) and _YAML_EXPONENT.fullmatch(value.strip()):
        value = float(value)  # `lr: 1e-3` in YAML (PyYAML reads it as the string '1e-3')
    value = _coerced(value, want)
    if _is_a(value, want):
        return value
    raise UserError(f"--config {path}: {key!r} must be {_TYPE_NAMES[want]}, got "
                    f"{type(value).__name__} {value!r}"[:300])
