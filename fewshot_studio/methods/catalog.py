"""The one method catalog: which methods exist, and what each one's id, label, summary, cost,
display order and settings are. The CLI, the app and the evaluation all read it from here.

A method class declares these as ClassVars (`name`, `label`, `summary`, `cost`, `order`) plus its
`Config` dataclass, whose fields carry their help text in `field(metadata={"help": ...})`; the
`@register` decorator adds it. `fewshot_studio.methods` imports every method module, so
importing anything from this package registers the built-in methods.

Settings are coerced by one strict rule (`coerce_settings`), used by the CLI, the app's form,
`make_config`/`make_method` and the evaluation's overrides alike.
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import DataError

if TYPE_CHECKING:
    from .base import Method

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method to the catalog under `cls.name`."""
    name = getattr(cls, "name", "")
    if not name or not getattr(cls, "label", ""):
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name` and `label` to be registered")
    if not is_dataclass(getattr(cls, "Config", None)):
        raise ValueError(f"{cls.__qualname__}.Config must be a dataclass")
    old = REGISTRY.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method id {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    REGISTRY[name] = cls
    _TYPES.pop(cls.Config, None)
    return cls


def unregister(method: str) -> None:
    """Remove a method from the catalog (tests and plug-ins that come and go)."""
    REGISTRY.pop(method, None)


def method_ids() -> list[str]:
    """Every registered method id, in the app's display order (`order`, then id)."""
    return sorted(REGISTRY, key=lambda m: (getattr(REGISTRY[m], "order", 0), m))


def by_cost(ids: Iterable[str]) -> list[str]:
    """`ids` cheapest first (`cost`, then display order); unregistered ids last, as given."""
    ids = list(ids)
    known = [m for m in ids if m in REGISTRY]
    known.sort(key=lambda m: (getattr(REGISTRY[m], "cost", 0), getattr(REGISTRY[m], "order", 0), m))
    return known + [m for m in ids if m not in REGISTRY]


def get_method_class(method: str) -> type["Method"]:
    if method not in REGISTRY:
        raise DataError(f"Unknown method {method!r}; choose one of {', '.join(method_ids())}.")
    return REGISTRY[method]


def label(method: str) -> str:
    return get_method_class(method).label


def summary(method: str) -> str:
    return getattr(get_method_class(method), "summary", "")


class _Labels(Mapping):
    """A live, read-only {id: label} view of the catalog (display order)."""

    def __getitem__(self, method: str) -> str:
        if method not in REGISTRY:
            raise KeyError(method)
        return REGISTRY[method].label

    def __iter__(self):
        return iter(method_ids())

    def __len__(self) -> int:
        return len(REGISTRY)


class _Order(Sequence):
    """A live, read-only view of `method_ids()`."""

    def __getitem__(self, i):
        return method_ids()[i]

    def __len__(self) -> int:
        return len(REGISTRY)


LABELS: Mapping[str, str] = _Labels()
ORDER: Sequence[str] = _Order()


# ---- settings ------------------------------------------------------------------------------------

_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
               "tuple": "a list"}
_TYPES: dict[type, dict[str, str]] = {}  # Config class -> {field: kind}


def _kind(tp: Any) -> str:
    """'int', 'float', 'bool', 'str', 'tuple' or 'any' for a field's (resolved) type; Optional ignored."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return "any"
        tp = args[0]
    tp = typing.get_origin(tp) or tp
    if tp in (bool, int, float, str):
        return tp.__name__
    return "tuple" if tp in (tuple, list) else "any"


def _kinds(cls: type["Method"]) -> dict[str, str]:
    cfg = cls.Config
    if cfg not in _TYPES:
        hints = typing.get_type_hints(cfg)
        _TYPES[cfg] = {f.name: _kind(hints.get(f.name, Any)) for f in fields(cfg)}
    return _TYPES[cfg]


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def settings(method: str) -> dict[str, Any]:
    """A method's editable settings with their defaults, in declaration order: the numbers and
    switches (an "auto" setting, e.g. MMA's steps, is None)."""
    cls = get_method_class(method)
    kinds = _kinds(cls)
    return {f.name: _default(f) for f in fields(cls.Config) if kinds[f.name] in ("int", "float", "bool")}


def _unknown(cls, names: Sequence[str]) -> DataError:
    known = ", ".join(sorted(f.name for f in fields(cls.Config)))
    which = (f"setting {names[0]!r}" if len(names) == 1
             else "settings " + ", ".join(repr(n) for n in names))
    return DataError(f"{cls.label} has no {which}; its settings are {known}.")


def setting_help(method: str, key: str) -> str:
    """The one-line help of a setting (its field's metadata "help"); the key when it has none."""
    cls = get_method_class(method)
    for f in fields(cls.Config):
        if f.name == key:
            return str(f.metadata.get("help") or key)
    raise _unknown(cls, [key])


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _coerce(kind: str, v: Any) -> Any:
    """One value to `kind`; ValueError when it does not fit."""
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
            return v.strip().lower() in ("true", "1")
        raise ValueError
    if kind in ("int", "float"):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        x = float(v.strip()) if isinstance(v, str) else float(v)
        if not math.isfinite(x):
            raise ValueError
        if kind == "float":
            return x
        if isinstance(v, int):
            return v
        if x != int(x):
            raise ValueError
        return int(x)
    if kind == "str":
        if not isinstance(v, str):
            raise ValueError
        return v
    if kind == "tuple":
        if isinstance(v, str) or not isinstance(v, (list, tuple)):
            raise ValueError
        return tuple(v)
    return v


def coerce_settings(method: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The one strict rule for a method's settings, wherever they come from (CLI, the app's form,
    make_method, evaluation overrides). Blank values (None, "") mean "the default" and are left
    out; whole-number settings take only whole numbers (2.0 is fine, 2.5 is not), switches only
    true/false (or 1/0), numbers must parse. An unknown setting or a value that does not fit
    raises a DataError of one sentence naming the method, the setting and what it takes."""
    cls = get_method_class(method)
    kinds = _kinds(cls)
    raw = dict(raw or {})
    unknown = sorted(k for k in raw if k not in kinds)
    if unknown:
        raise _unknown(cls, unknown)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if _blank(v):
            continue
        try:
            out[k] = _coerce(kinds[k], v)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"The {cls.label} setting {k!r} must be {_KIND_WORDS[kinds[k]]}, not {v!r}.") from None
    return out


def make_config(method: str, **overrides) -> Any:
    """The method's Config with its defaults plus `overrides` (coerced by `coerce_settings`)."""
    return get_method_class(method).Config(**coerce_settings(method, overrides))
