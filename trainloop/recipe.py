"""Recipes: Python files with a ``Config`` dataclass and a ``build(cfg) -> Learner``.

Every ``Config`` field becomes a command-line option: ``batch_size: int = 200`` is
``--batch-size 200``. Supported field types: ``int``, ``float``, ``str``, ``Path``,
``bool`` (``--flag`` / ``--no-flag``), ``Literal[...]`` (choices), ``X | None``
(``none`` on the command line), and ``tuple[X, ...]`` / ``list[X]`` (several values).
A field's help text comes from ``field(metadata={"help": "..."})``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any

from trainloop.errors import UsageError


def load_recipe(path: str | Path) -> types.ModuleType:
    """Import the recipe file at ``path`` and check that it has ``Config`` and ``build``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(str(file) for file in path.glob("*.py") if not file.name.startswith("_"))
        such_as = f" ({', '.join(files[:5])}{', ...' if len(files) > 5 else ''})" if files else ""
        raise UsageError(f"recipe {path} is a folder, not a file: give a recipe .py file{such_as}")
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist: give the path of a recipe .py file")
    name = f"trainloop_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"recipe {path} is not a Python file: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    config = getattr(module, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise UsageError(f"recipe {path} has no Config dataclass: add '@dataclass class Config'")
    if not callable(getattr(module, "build", None)):
        raise UsageError(f"recipe {path} has no build(cfg) function that returns a Learner")
    return module


def add_config_options(parser: argparse.ArgumentParser, config_class: type) -> list[str]:
    """Add one option per ``Config`` field to ``parser``; return the field names."""
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group("recipe options (the Config fields)")
    names = []
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        names.append(field.name)
        default = _default_of(field)
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = hints[field.name]
        kwargs = _argparse_kwargs(kind, flag)
        shown = default if not isinstance(default, (tuple, list)) else " ".join(map(str, default))
        group.add_argument(
            flag,
            dest=field.name,
            default=default,
            help=f"{help_text} (default: {shown})".strip(),
            **kwargs,
        )
    return names


def make_config(config_class: type, options: argparse.Namespace, names: list[str]) -> Any:
    """Build the recipe's ``Config`` from parsed options."""
    values = {}
    hints = typing.get_type_hints(config_class)
    for name in names:
        value = getattr(options, name)
        if typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return config_class(**values)


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _argparse_kwargs(kind: Any, flag: str) -> dict[str, Any]:
    origin = typing.get_origin(kind)
    arguments = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in arguments:
        inner = [argument for argument in arguments if argument is not type(None)]
        kwargs = _argparse_kwargs(inner[0], flag)
        convert = kwargs.get("type", str)
        kwargs["type"] = _optional(convert)
        return kwargs
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(arguments), "type": type(arguments[0])}
    if origin in (tuple, list):
        item = arguments[0] if arguments else str
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            return {
                "type": _converter(item),
                "nargs": len(arguments),
                "metavar": item.__name__.upper(),
            }
        return {"type": _converter(item), "nargs": "+", "metavar": item.__name__.upper()}
    if kind in (int, float, str, Path):
        return {"type": _converter(kind), "metavar": kind.__name__.upper()}
    raise UsageError(f"Config field type {kind!r} of {flag} is not supported on the command line")


def _converter(kind: type) -> Any:
    if kind is Path:
        return Path
    return kind


def _optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in errors
    return parse


def config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Build ``config_class`` from the JSON values saved in ``model.pt``.

    Turns strings back into ``Path`` and lists back into tuples where the field's type
    says so; unknown keys are an error, missing ones take their defaults.
    """
    hints = typing.get_type_hints(config_class)
    known = {field.name for field in dataclasses.fields(config_class) if field.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
    return config_class(**{name: _convert(hints[name], value) for name, value in values.items()})


def _convert(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [argument for argument in typing.get_args(kind) if argument is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if kind is Path:
        return Path(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


RUN_ONLY_OPTIONS = frozenset(
    {"out", "resume", "overwrite", "config", "debug", "strict_plugins", "nproc_per_node"}
)
"""Options that say how to start one process, not what the run is: a config file skips them."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The option values in a run's ``config.json``, or in a TOML file, by option name.

    ``config.json`` (what ``trainloop run`` writes) gives its ``options`` and its
    ``config`` (the recipe's fields); a TOML file gives its top-level keys, spelt as the
    options are (``batch-size`` or ``batch_size``). Options that only say how to start a
    process (``--out``, ``--resume``, ...) are left out.

    Raises:
        UsageError: the file is missing or malformed (naming the line).
    """
    path = Path(path)
    where = f"--config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"{where}: no such file; give a run's config.json or a .toml file"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{where}: cannot read it ({error})") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise UsageError(f"{where}: not valid TOML ({error})") from None
    else:
        import json

        try:
            document = json.loads(text)
        except ValueError as error:
            raise UsageError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
            raise UsageError(
                f'{where}: not a run\'s config.json (no "config" object); give the config.json '
                "of a run folder, or a .toml file of option = value lines"
            )
        values = {**(document.get("options") or {}), **document["config"]}
    for key, value in values.items():
        if isinstance(value, dict):
            raise UsageError(
                f"{where}: {key!r} is a table; give option = value lines at the top level"
            )
    return {
        key.replace("-", "_"): value
        for key, value in values.items()
        if key.replace("-", "_") not in RUN_ONLY_OPTIONS
    }
