"""Command-line options built from the commands' config dataclasses, and the checks that run before any model loads.

Every field of a config dataclass (CensusConfig, AblateConfig, MatrixSizes, BudgetSizes, ConvertConfig) that has a
help text in its metadata is one option of its command, with the field's default and the help text:

    lora_dropout: float = field(default=0.0, metadata={"help": "dropout of the LoRA adapters (0-1)"})

becomes `--lora-dropout FLOAT` with no edit here or in cli.py; its range check belongs in the dataclass's
`__post_init__`, which runs before anything is loaded or written. How a field reads from the command line:

    bool                          --name / --no-name
    int, float, str               one value (floats must be finite)
    int named tokens / *_tokens   a token count: 20M, 512K, 1.5M or 100000, the suffixes binary (1K = 1,024 tokens)
    Optional[int | float | str]   one value, or absent (None)
    tuple or list of int/float/str  comma-separated (metadata {"separator": ";"} for values that hold commas)

Metadata {"cli": False} keeps a field off the command line; a `thresholds` field gives one --ROLE-threshold per
role the probes declare. Everything here imports without torch, so `--help` and option errors answer at once.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import typing
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from attnprobe.analyses.conversion.config import format_tokens, parse_tokens
from attnprobe.errors import AttnprobeError
from attnprobe.probe import declared

TOKEN_HELP = " (K = 1,024 tokens, M = 1,048,576: binary)"


def option_name(field_name: str) -> str:
    return f"--{field_name.replace('_', '-')}"


def parse_sequence(text: str, name: str, kind: type, separator: str = ",") -> tuple:
    """Comma-separated (or `separator`-separated) values of `kind` (int, float or str), refused when unreadable."""
    items = [x.strip() for x in text.split(separator) if x.strip()]
    if kind is str:
        return tuple(items)
    try:
        values = [float(x) for x in items]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise AttnprobeError(f"{name} takes comma-separated numbers, got '{text}'")
    if kind is int:
        if any(v != int(v) for v in values):
            raise AttnprobeError(f"{name} takes whole numbers, got '{text}'")
        return tuple(int(v) for v in values)
    return tuple(values)


def is_token_count(field_name: str, kind) -> bool:
    return kind is int and (field_name == "tokens" or field_name.endswith("_tokens"))


@dataclasses.dataclass
class FieldOption:
    """How one dataclass field reads from the command line."""

    field: dataclasses.Field
    kind: typing.Any  # the field's type: int, float, str, bool or Optional of one
    item: type | None = None  # the element type of a sequence field
    container: type = tuple  # a sequence field's own type: tuple or list

    @property
    def default(self):
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def parameter(self) -> inspect.Parameter:
        """The typer parameter: sequences and token counts are read as text and parsed by `value`."""
        help_text, annotation, default = self.field.metadata["help"], self.kind, self.default
        if self.item is not None:
            annotation, default = str, self.field.metadata.get("separator", ",").join(str(v) for v in default)
        elif is_token_count(self.field.name, self.kind):
            annotation, default, help_text = str, format_tokens(default), help_text + TOKEN_HELP
        return inspect.Parameter(self.field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, help=help_text))

    def value(self, given):
        name = option_name(self.field.name)
        if self.item is not None:
            return self.container(parse_sequence(given, name, self.item, self.field.metadata.get("separator", ",")))
        if is_token_count(self.field.name, self.kind):
            return parse_tokens(given)
        if isinstance(given, float) and not math.isfinite(given):
            raise AttnprobeError(f"{name} takes a finite number, got {given}")
        return given


def field_options(config_class, exclude: tuple[str, ...] = ()) -> list[FieldOption]:
    """One FieldOption per field of `config_class` with a help text (and not `cli: False`)."""
    hints = typing.get_type_hints(config_class)
    options = []
    for f in dataclasses.fields(config_class):
        if f.name in exclude or "help" not in f.metadata or not f.metadata.get("cli", True):
            continue
        kind, choices = hints[f.name], set(typing.get_args(hints[f.name]))
        if typing.get_origin(kind) in (list, tuple):
            options.append(FieldOption(f, str, typing.get_args(kind)[0], typing.get_origin(kind)))
        elif kind in (bool, int, float, str) or (type(None) in choices and len(choices) == 2 and choices - {type(None)} <= {int, float, str}):
            options.append(FieldOption(f, kind))
        else:
            raise TypeError(f"{config_class.__name__}.{f.name}: no command-line form for {kind} (give it metadata cli=False)")
    return options


def config_options(config_class, exclude: tuple[str, ...] = ()):
    """Decorator: give a command one option per field of `config_class` (see the module docstring) and, when the
    class has `thresholds`, one --ROLE-threshold per declared role. The command receives the built and checked
    `config` (and, if it takes `given`, the names of the fields set on the command line)."""
    options = field_options(config_class, exclude)
    thresholds = declared.default_thresholds() if "thresholds" in {f.name for f in dataclasses.fields(config_class)} else {}

    def decorate(command):
        own = inspect.signature(command)
        params = [p for p in own.parameters.values() if p.name not in ("config", "given")]
        params += [option.parameter() for option in options]
        params += [inspect.Parameter(f"{role}_threshold", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                                     default=typer.Option(default, help=f"threshold of the {role.replace('_', ' ')} role"))
                   for role, default in thresholds.items()]
        params.append(inspect.Parameter("_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(command)
        def wrapper(_context: typer.Context, **kwargs):
            values = {option.field.name: option.value(kwargs.pop(option.field.name)) for option in options}
            if thresholds:
                values["thresholds"] = {role: kwargs.pop(f"{role}_threshold") for role in thresholds}
            if "given" in own.parameters:
                kwargs["given"] = {o.field.name for o in options
                                   if getattr(_context.get_parameter_source(o.field.name), "name", "") == "COMMANDLINE"}
            return command(config=config_class(**values), **kwargs)

        del wrapper.__wrapped__  # typer reads the signature below, not the command's own
        wrapper.__signature__ = own.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def with_preset(config, given: set[str], preset):
    """`preset` (a classmethod like MatrixSizes.quick) with the options the user gave kept; `config` without a preset."""
    return preset(**{name: getattr(config, name) for name in given}) if preset else config


def run_dir(out: Optional[Path], kind: str, model: str) -> Path:
    """The run directory (a new one per run by default), refused now if it can never be written."""
    out = out or Path("runs") / f"{kind}-{Path(model).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise AttnprobeError(f"--out {out} is a file, not a directory: choose a directory")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise AttnprobeError(f"--out {out} lies inside the file {existing}: choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnprobeError(f"--out {out} cannot be written ({existing} is not writable): choose another directory")
    return out


def listed(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
