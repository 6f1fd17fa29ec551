"""Config dataclasses whose fields *are* the CLI flags.

A field is declared with :func:`flag` (an option) or :func:`arg` (a positional
argument); its ``help`` is the flag's help text. :func:`add_command` turns a config
class into a typer command: flags map 1:1 to fields (``max_steps`` -> ``--max-steps``),
the parsed values build the config (whose ``__post_init__`` validates and raises
:class:`ConfigError` naming the field), and the run function receives the config.

Run functions are named as ``"module:function"`` strings and imported only when the
command runs, so ``cocomix --help`` does not import torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import typing
from pathlib import Path
from typing import Any, Callable

import typer

from cocomix.core.errors import CocomixError, ConfigError

log = logging.getLogger(__name__)

_SUPPORTED = (str, int, float, bool, Path)
_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", Path: "PATH"}  #: bool flags take no value: none shown


def flag(default: Any = dataclasses.MISSING, help: str = "", *, short: str | None = None) -> Any:
    """A config field exposed as ``--field-name`` (required when it has no default)."""
    return dataclasses.field(default=default, metadata={"help": help, "short": short})


def arg(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A config field exposed as a positional argument."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": True})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X`` or ``X | None``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1, f"unsupported union {tp}"
        return rest[0], True
    return tp, False


def _parameter(field: dataclasses.Field, tp: Any) -> inspect.Parameter:
    base, optional = _base_type(tp)
    many = typing.get_origin(base) is list  # a repeatable option, or a positional taking several values
    item = typing.get_args(base)[0] if many else base
    assert item in _SUPPORTED, f"config field {field.name}: unsupported type {tp}"
    meta = field.metadata
    default = field.default if field.default is not dataclasses.MISSING else ...
    if meta.get("positional"):
        info = typer.Argument(default, help=meta.get("help", ""), show_default=default is not ..., metavar=field.name.upper())
    else:
        names = [flag_name(field.name)]
        if base is bool:
            names = [f"{flag_name(field.name)}/--no-{field.name.replace('_', '-')}"]
        if meta.get("short"):
            names.append(meta["short"])
        info = typer.Option(default, *names, help=meta.get("help", ""), metavar=_METAVARS.get(item))
    annotation = typing.List[item] if many else base  # noqa: UP006 (typer reads typing.List)
    annotation = typing.Optional[annotation] if optional else annotation
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def resolve(target: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_command(config_cls: type, run: str, doc: str | None = None) -> Callable[..., None]:
    """A function typer can register: its signature is the config's fields."""
    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.init]
    params = [_parameter(f, hints[f.name]) for f in fields]

    def command(**kwargs: Any) -> None:
        try:
            _refuse_non_finite(kwargs)
            config = config_cls(**kwargs)
            resolve(run)(config)
        except CocomixError as err:
            _error(str(err))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            hint = getattr(config_cls, "RESUME", "")
            _error(f"interrupted; nothing finished is lost{': ' + hint if hint else ''}", label="stopped")
            raise typer.Exit(130) from None
        except OSError as err:  # a path that cannot be created or read, a full disk: one line, not a traceback
            if log.isEnabledFor(logging.DEBUG):
                raise
            _error(f"{err} (run `cocomix -v ...` for the traceback)")
            raise typer.Exit(2) from None

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc or config_cls.__doc__
    command.__name__ = config_cls.__name__
    return command


def _refuse_non_finite(values: dict) -> None:
    """No float flag takes inf or nan: every one is a size, a rate or a weight."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag_name(name)} must be a finite number, got {value}")


def _error(message: str, label: str = "error") -> None:
    from cocomix.core.logs import console

    console.print(f"[bold red]{label}:[/] {message}", highlight=False, soft_wrap=True)


def add_command(app: typer.Typer, name: str, config_cls: type, run: str, doc: str | None = None) -> None:
    """Register ``config_cls`` as command ``name`` of ``app``; ``run`` is ``"module:function"``."""
    app.command(name, help=doc or config_cls.__doc__)(build_command(config_cls, run, doc))
