"""Command-line flags derived from the config dataclasses (the CLI and the benchmarks' commands share them), so defaults and help cannot drift from the code.

    add_config_flags(parser, SchedulerConfig)               # --policy, --chunk-size, ... with their docs
    scheduler = config_from_flags(SchedulerConfig, args)

Each field becomes ``--field-name`` (``FLAG_NAMES`` keeps a few short historical names), with the field's
type, its default, and as help the docstring written under it in the dataclass. Enum fields offer their
values as choices; ``bool`` fields are ``--x/--no-x``; ``*_bytes`` fields also take K/M/G suffixes
(binary). The dataclass's own ``__post_init__`` still checks ranges, so a bad value is a usage error
naming the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any

FLAG_NAMES = {"model_dir": "--model", "pp_size": "--pp", "torch_threads": "--threads"}
"""Fields whose flag is not ``--field-name``."""

_SIZE_SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls``, first sentence kept short for ``--help``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split()).replace("%", "%%")
    return docs


def parse_bytes(text: str) -> int:
    """``268435456``, ``256M``, ``256MiB`` or ``1G`` as a number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a number of bytes such as 268435456 or 256M, got {text!r}")
    return int(match[1]) * _SIZE_SUFFIXES[match[2]]


def _flag_type(name: str, hint: Any) -> tuple[Any, dict[str, Any]]:
    """The argparse type and extra keywords for a field's type hint (``X | None`` is X)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        [hint] = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str, {"choices": [m.value for m in hint]}
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if hint is int and name.endswith("_bytes"):
        return parse_bytes, {}
    if hint in (int, float, str):
        return hint, {}
    raise TypeError(f"{name}: no command-line flag for type {hint!r}")


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    only: typing.Collection[str] | None = None,
    skip: typing.Collection[str] = (),
    unset: typing.Collection[str] = (),
    unset_help: str = "",
) -> None:
    """One flag per init field of dataclass ``cls`` (or of ``only``), destination the field's name. A field in
    ``unset`` defaults to ``None`` (the caller fills it in, e.g. from the model) and its help ends with
    ``unset_help`` and the field's own default."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or (only is not None and f.name not in only):
            continue
        flag_type, extra = _flag_type(f.name, hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, ""), **extra}
        if flag_type is not None:
            kwargs["type"] = flag_type
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = default.value if isinstance(default, enum.Enum) else default
            if f.name in unset:
                kwargs["default"] = None
                kwargs["help"] += f" (default: {unset_help}, else {default})".replace("%", "%%")
            else:
                kwargs["default"] = default
                kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-")), **kwargs)


def add_sampling_flags(parser: argparse.ArgumentParser, unset_help: str) -> None:
    """A flag per ``SamplingParams`` field (``--ignore-eos`` too), in a group of their own; the sampling fields
    default to ``None``, which ``unset_help`` says who fills in."""
    from pipeline.request import SamplingParams
    from pipeline.sampling import FIELD_NAMES

    group = parser.add_argument_group("sampling")
    add_config_flags(
        group, SamplingParams, skip=("stop_token_ids",), unset=FIELD_NAMES, unset_help=unset_help
    )


def config_from_flags(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build dataclass ``cls`` from the flags ``add_config_flags`` added (missing ones keep defaults)."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)
    }
    return cls(**{**values, **overrides})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that build an ``EngineConfig``, one per config field; shared by every command that runs it."""
    from pipeline.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig

    for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig):
        add_config_flags(parser.add_argument_group(cls.__name__), cls)


def engine_config_from_args(args: argparse.Namespace):  # -> EngineConfig
    from pipeline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

    return EngineConfig(
        model=config_from_flags(ModelConfig, args),
        cache=config_from_flags(CacheConfig, args),
        scheduler=config_from_flags(SchedulerConfig, args),
        parallel=config_from_flags(ParallelConfig, args),
    )
