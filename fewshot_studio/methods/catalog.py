"""The one method catalog: which methods exist, and what each one's id, label, summary, cost,
display order and settings are. The CLI, the app and the evaluation all read it from here.

A method class declares these as ClassVars (`name`, `label`, `summary`, `cost`, `order`) plus its
`Config` dataclass, whose fields carry their help text and, for numbers, their inclusive bounds
in `field(metadata={"help": ..., "min": ..., "max": ...})` (a tuple of numbers takes one bound for
every element, or one per element), and for a text setting with fixed values its `"choices"`;
the `@register` decorator adds it and checks that every default lies inside its bounds (and
among its choices). `fewshot_studio.methods` imports every method module, so
importing anything from this package registers the built-in methods.

`auto` is one more method *choice* (not a method): the CLI's `train --method`, the app's Train tab
(its default, `DEFAULT_CHOICE`) and `eval --methods` offer it (`choices`). It cross-validates the
candidates (`auto_candidates`: the classes that declare `auto_candidate = "always"`, plus "gpu"
ones such as MMA when a GPU is present or the user asks) and trains the winner; the work lives
in `evaluation.auto` (L3), since cross-validation is evaluation. Its settings (`AutoConfig`: time
budget, MMA switch, seed) go through the same `settings`/`bounds`/`coerce_settings` as a method's.

Settings are coerced by one strict rule (`coerce_settings`), used by the CLI, the app's form,
`make_config`/`make_method`, the evaluation's overrides and the loading of a saved model alike:
a setting out of its bounds is refused before anything is built.
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import DataError

if TYPE_CHECKING:
    from .base import Method

REGISTRY: dict[str, type["Method"]] = {}

#: The method choice that cross-validates the candidates and trains the best (evaluation.auto).
AUTO = "auto"
#: The Train tab's preselected choice.
DEFAULT_CHOICE = AUTO
#: Auto's time budget, seconds of cross-validation fits (features extracted before it starts are
#: not counted: the winner needs them anyway). Measured on the busy 2-core CPU at ViT-B-32 size
#: (d = 512, random weights, 1 thread, 5 classes, cached features, Auto's folds): all five
#: candidates take 9 s at 4 shots and 25 s at 16 shots (GraphAdapter 7-10 s of it, ProKeR up to
#: 12 s); 60 s leaves room for a machine two or three times busier, and past that drops the
#: costliest candidates rather than keep the user waiting minutes.
AUTO_BUDGET_S = 60.0


@dataclass
class AutoConfig:
    """Auto's settings (read like a method's Config by `settings`, `bounds`, `coerce_settings`)."""

    budget_s: float = field(default=AUTO_BUDGET_S, metadata={
        "help": "time budget for the cross-validation (s)", "min": 1, "max": 3600})
    with_mma: bool = field(default=False, metadata={
        "help": "also cross-validate MMA (always on a GPU)"})
    seed: int = field(default=0, metadata={"help": "seed", "min": 0, "max": 2**32 - 1})


class _AutoChoice:
    """What the catalog's settings functions read of a method class, for `auto`."""

    name = AUTO
    label = "Auto"
    summary = ("Auto: cross-validates zero-shot CLIP, Tip-Adapter, GDA, ProKeR and GraphAdapter on your "
               "examples (the same folds for each, cheapest first, within a time budget; MMA too on a GPU), "
               "then trains the most accurate on all of them.")
    Config = AutoConfig


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method to the catalog under `cls.name`."""
    name = getattr(cls, "name", "")
    if not name or not getattr(cls, "label", ""):
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name` and `label` to be registered")
    if name == AUTO:
        raise ValueError(f"method id {AUTO!r} is the catalog's Auto choice; pick another id")
    if not is_dataclass(getattr(cls, "Config", None)):
        raise ValueError(f"{cls.__qualname__}.Config must be a dataclass")
    old = REGISTRY.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method id {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _TYPES.pop(cls.Config, None)
    _SHAPES.pop(cls.Config, None)
    _check_bounds(cls)
    REGISTRY[name] = cls
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


def closed_form(method: str) -> bool:
    """Whether the method fits in closed form on cached features (its class's `closed_form`):
    accepting or correcting a pool label then refits its model at once."""
    return bool(getattr(get_method_class(method), "closed_form", False))
def _entry(method: str) -> Any:
    """The method class, or the `auto` choice, whose Config/label the settings functions read."""
    return _AutoChoice if method == AUTO else get_method_class(method)


def choices() -> list[str]:
    """What a user may ask to train: `auto`, then every method in display order."""
    return [AUTO, *method_ids()]


def auto_candidates(gpu: bool = False, with_mma: bool = False) -> list[str]:
    """The methods Auto cross-validates, cheapest first: those whose class declares
    `auto_candidate = "always"`, plus the "gpu" ones (MMA: minutes of steps per fit on a CPU)
    when a GPU is present or `with_mma`."""
    want = ("always", "gpu") if gpu or with_mma else ("always",)
    return by_cost(m for m in method_ids() if getattr(REGISTRY[m], "auto_candidate", "never") in want)


def label(method: str) -> str:
    return _entry(method).label


def summary(method: str) -> str:
    return getattr(_entry(method), "summary", "")


class _Labels(Mapping):
    """A live, read-only {id: label} view of the catalog (display order)."""

    def __getitem__(self, method: str) -> str:
        if method == AUTO:
            return _AutoChoice.label
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
_PLURAL_WORDS = {"int": "whole numbers", "float": "numbers", "bool": "true/false values", "str": "texts"}
_TYPES: dict[type, dict[str, str]] = {}  # Config class -> {field: kind}
_SHAPES: dict[type, dict[str, tuple[str, int | None]]] = {}  # Config class -> {list field: (item kind, length)}


def _optional_arg(tp: Any) -> Any:
    """`tp` without Optional; None when it is a union of several types."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _kind(tp: Any) -> str:
    """'int', 'float', 'bool', 'str', 'tuple' or 'any' for a field's (resolved) type; Optional ignored."""
    tp = _optional_arg(tp)
    if tp is None:
        return "any"
    tp = typing.get_origin(tp) or tp
    if tp in (bool, int, float, str):
        return tp.__name__
    return "tuple" if tp in (tuple, list) else "any"


def _shape(tp: Any) -> tuple[str, int | None]:
    """(item kind, fixed length or None) of a list/tuple field's type: tuple[int, int] -> ('int', 2),
    tuple[str, ...] -> ('str', None); ('any', None) when the items are not one plain type."""
    args = typing.get_args(_optional_arg(tp))
    if not args:
        return "any", None
    if len(args) == 2 and args[1] is Ellipsis:
        return _kind(args[0]), None
    kinds = {_kind(a) for a in args}
    item = kinds.pop() if len(kinds) == 1 else "any"
    return item, (len(args) if typing.get_origin(_optional_arg(tp)) is tuple else None)


def _kinds(cls: type["Method"]) -> dict[str, str]:
    cfg = cls.Config
    if cfg not in _TYPES:
        hints = typing.get_type_hints(cfg)
        _TYPES[cfg] = {f.name: _kind(hints.get(f.name, Any)) for f in fields(cfg)}
        _SHAPES[cfg] = {f.name: _shape(hints.get(f.name, Any)) for f in fields(cfg) if _TYPES[cfg][f.name] == "tuple"}
    return _TYPES[cfg]


def _shapes(cls: type["Method"]) -> dict[str, tuple[str, int | None]]:
    _kinds(cls)
    return _SHAPES[cls.Config]


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def settings(method: str) -> dict[str, Any]:
    """A method's editable settings with their defaults, in declaration order: the numbers and
    switches (an "auto" setting, e.g. MMA's steps, is None)."""
    cls = _entry(method)
    kinds = _kinds(cls)
    return {f.name: _default(f) for f in fields(cls.Config) if kinds[f.name] in ("int", "float", "bool")}


def _bounds_of(cls: type["Method"]) -> dict[str, tuple[Any, Any]]:
    return {f.name: (f.metadata.get("min"), f.metadata.get("max")) for f in fields(cls.Config)
            if f.metadata.get("min") is not None or f.metadata.get("max") is not None}


def setting_choices(method: str) -> dict[str, tuple[str, ...]]:
    """{setting: its allowed values} of a method's text settings with fixed values (declared as
    `metadata={"choices": (...)}`, e.g. MMA's recipe)."""
    return {f.name: tuple(f.metadata["choices"]) for f in fields(_entry(method).Config)
            if f.metadata.get("choices") is not None}


def bounds(method: str) -> dict[str, tuple[Any, Any]]:
    """{setting: (min, max)} of a method's bounded settings, inclusive, as declared next to their
    help (`metadata={"min": ..., "max": ...}`); None on a side without a bound. A list setting's
    bounds hold for each of its numbers."""
    return _bounds_of(_entry(method))


def _num(x: Any) -> str:
    """A number as a person writes it: 10000000, 0.5, 1e-07."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return str(x)


def _shown(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return _num(v)


def _range_words(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"between {_num(lo)} and {_num(hi)}"
    return f"at least {_num(lo)}" if lo is not None else f"at most {_num(hi)}"


def _outside(x: Any, lo: Any, hi: Any) -> bool:
    return (lo is not None and x < lo) or (hi is not None and x > hi)


def _is_number(b: Any) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)


def _check_bounds(cls: type["Method"]) -> None:
    """At registration: bounds are numbers on number settings, and every default lies inside."""
    kinds, shapes = _kinds(cls), _shapes(cls)
    for f in fields(cls.Config):
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        where = f"{cls.__qualname__}.Config.{f.name}"
        options = f.metadata.get("choices")
        if options is not None:
            if kinds[f.name] != "str" or not options or not all(isinstance(o, str) for o in options):
                raise ValueError(f"{where}: only text settings take choices, and they must be texts")
            if _default(f) not in options:
                raise ValueError(f"{where}: the default {_default(f)!r} is not one of its choices {tuple(options)!r}")
        if lo is None and hi is None:
            continue
        numeric = kinds[f.name] in ("int", "float") or shapes.get(f.name, ("",))[0] in ("int", "float")
        if not numeric:
            raise ValueError(f"{where}: only number settings take bounds")
        if not all(b is None or _is_number(b) for b in (lo, hi)) or (lo is not None and hi is not None and lo > hi):
            raise ValueError(f"{where}: bounds must be numbers with min <= max, not {lo!r}..{hi!r}")
        d = _default(f)
        values = d if isinstance(d, (tuple, list)) else () if d is None else (d,)
        if any(_outside(x, lo, hi) for x in values):
            raise ValueError(f"{where}: the default {d!r} is outside its bounds {lo!r}..{hi!r}")


def _unknown(cls, names: Sequence[str]) -> DataError:
    known = ", ".join(sorted(f.name for f in fields(cls.Config)))
    which = (f"setting {names[0]!r}" if len(names) == 1
             else "settings " + ", ".join(repr(n) for n in names))
    return DataError(f"{cls.label} has no {which}; its settings are {known}.")


def setting_help(method: str, key: str) -> str:
    """The one-line help of a setting (its field's metadata "help"); the key when it has none."""
    cls = _entry(method)
    for f in fields(cls.Config):
        if f.name == key:
            return str(f.metadata.get("help") or key)
    raise _unknown(cls, [key])


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _coerce(kind: str, v: Any, shape: tuple[str, int | None] = ("any", None)) -> Any:
    """One value to `kind` (a list's items to shape's item kind, and its length); ValueError when
    it does not fit."""
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
        item, length = shape
        if (length is not None and len(v) != length) or (length is None and item != "any" and not v):
            raise ValueError
        return tuple(v) if item == "any" else tuple(_coerce(item, x) for x in v)
    return v


def _kind_words(kind: str, shape: tuple[str, int | None]) -> str:
    item, length = shape
    if kind != "tuple" or item == "any":
        return _KIND_WORDS[kind]
    return f"a list of {length} {_PLURAL_WORDS[item]}" if length else f"a non-empty list of {_PLURAL_WORDS[item]}"


def coerce_settings(method: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The one strict rule for a method's settings, wherever they come from (CLI, the app's form,
    make_method, evaluation overrides, a saved model's config.json). Blank values (None, "")
    mean "the default" and are left out; whole-number settings take only whole numbers (2.0 is
    fine, 2.5 is not), switches only true/false (or 1/0), numbers must parse and be finite,
    lists must have their items' type (and length), numbers must lie inside the bounds
    declared next to their help (`bounds`) and a text with fixed values must be one of them
    (`choices`). An unknown setting or a value that does not fit
    raises a DataError of one sentence naming the method, the setting and what it takes."""
    cls = _entry(method)
    kinds, shapes, limits = _kinds(cls), _shapes(cls), _bounds_of(cls)
    options = {f.name: tuple(f.metadata["choices"]) for f in fields(cls.Config) if f.metadata.get("choices")}
    raw = dict(raw or {})
    unknown = sorted(k for k in raw if k not in kinds)
    if unknown:
        raise _unknown(cls, unknown)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if _blank(v):
            continue
        shape = shapes.get(k, ("any", None))
        try:
            x = _coerce(kinds[k], v, shape)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"The {cls.label} setting {k!r} must be {_kind_words(kinds[k], shape)}, "
                            f"not {v!r}.") from None
        if k in limits:
            lo, hi = limits[k]
            if any(_outside(n, lo, hi) for n in (x if isinstance(x, tuple) else (x,))):
                which = "must be" if not isinstance(x, tuple) else f"must hold {_PLURAL_WORDS[shape[0]]}"
                raise DataError(f"The {cls.label} setting {k!r} {which} {_range_words(lo, hi)}, not {_shown(x)}.")
        if k in options and x not in options[k]:
            raise DataError(f"The {cls.label} setting {k!r} must be one of {', '.join(options[k])}, not {x!r}.")
        out[k] = x
    return out


def make_config(method: str, **overrides) -> Any:
    """The method's Config with its defaults plus `overrides` (coerced by `coerce_settings`)."""
    return get_method_class(method).Config(**coerce_settings(method, overrides))
