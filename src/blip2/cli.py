"""``blip2 <command>``: each command is one typed function in ``blip2.commands``; its docstring is its help.

The parser is derived from the function's signature: positional parameters become positional arguments,
keyword parameters become ``--options`` (``bool`` ones become flags, ``list[...]`` ones take several values,
``Literal[...]`` ones take one of their values; ``Annotated[type, "help"]`` gives the option its help line). A
parameter whose type is a dataclass (e.g. the generation options) contributes one ``--option`` per field and is
rebuilt from them before the call. A positional-only parameter with a default (before ``/``) is an optional
positional argument; a keyword-only one without a default (after ``*``) is a required ``--option``. A
``(name, [functions])`` entry of ``COMMANDS`` is a command group: ``blip2 name build`` runs ``name_build`` (the
``name_`` prefix is dropped).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
import typing
from collections.abc import Callable

from blip2 import commands
from blip2.errors import InputError


def _option_type(annotation) -> tuple[Callable | None, bool, tuple | None]:
    """(converter, takes several values, choices) for a type hint such as ``int``, ``str | None``, ``list[str]``
    or ``Literal["a", "b"]``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return type(args[0]), False, tuple(args)
    if origin in (list, tuple):  # tuple[X, ...]: several values too
        return (args[0] if args else str), True, None
    if args:  # Optional[X] / X | None
        return _option_type(args[0])
    return (annotation if annotation in (int, float, str) else None), False, None


FLAG_ALIASES = {"json_output": ["--json"]}  # extra spellings of some options
OPTION_SPELLING = "__as_option"  # dest suffix of an optional positional's --option spelling
LOG_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


def _help_of(annotation) -> tuple[object, str | None]:
    """(the type, its help line) of ``Annotated[type, "help"]``; (annotation, None) for a plain type."""
    if typing.get_origin(annotation) is typing.Annotated:
        kind, *metadata = typing.get_args(annotation)
        return kind, next((m for m in metadata if isinstance(m, str)), None)
    return annotation, None


def _add_argument(parser: argparse.ArgumentParser, name: str, annotation, default, dest: str | None = None,
                  param_kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) -> None:
    """One positional argument (no default; positional-only: optional) or ``--option`` (keyword-only without a
    default: required) for a parameter or dataclass field."""
    annotation, described = _help_of(annotation)
    kind, many, choices = _option_type(annotation)
    required = param_kind is inspect.Parameter.KEYWORD_ONLY and default is inspect.Parameter.empty
    if (default is inspect.Parameter.empty and not required) or param_kind is inspect.Parameter.POSITIONAL_ONLY:
        optional = default is not inspect.Parameter.empty
        nargs = ("*" if optional else "+") if many else ("?" if optional else None)
        parser.add_argument(name, type=kind, nargs=nargs, choices=choices, help=described,
                            **({"default": default} if optional else {}))
        if optional and not many:  # also spelled as an option (--source PATH for SOURCE)
            parser.add_argument(f"--{name.replace('_', '-')}", dest=f"{name}{OPTION_SPELLING}", type=kind,
                                choices=choices, metavar=name.upper(), help=f"the same as {name.upper()}")
        return
    flags = [f"--{name.replace('_', '-')}", *FLAG_ALIASES.get(name, [])]
    note = "(required)" if required else "" if default is None and described else f"(default: {default})"
    if annotation is bool:
        parser.add_argument(*flags, dest=dest or name, action=argparse.BooleanOptionalAction, default=default,
                            help=described)
        return
    parser.add_argument(  # a repeated list option adds to the list (--set a=1 --set b=2), never replaces it
        *flags, dest=dest or name, type=kind, nargs="+" if many else None, choices=choices,
        action="extend" if many else "store", metavar=None if choices else name.upper(),
        help=" ".join(filter(None, (described, note))),
        **({"required": True} if required else {"default": list(default) if many and default is not None else default}),
    )  # fmt: skip


def command_name(fn: Callable) -> str:
    """``cache_features`` -> ``cache-features``; a trailing ``_`` avoids a builtin (``eval_`` -> ``eval``)."""
    return fn.__name__.rstrip("_").replace("_", "-")


def _add_command(subparsers, fn: Callable, prefix: str | None = None) -> None:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    command = command_name(fn).removeprefix(f"{prefix}-") if prefix else command_name(fn)
    parser = subparsers.add_parser(
        command, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    groups = {}  # dataclass parameters: name -> (class, its field names)
    for name, param in inspect.signature(fn).parameters.items():
        annotation = hints.get(name, str)
        if dataclasses.is_dataclass(annotation):
            fields = dataclasses.fields(annotation)
            field_hints = typing.get_type_hints(annotation)
            group = parser.add_argument_group(annotation.__name__, (inspect.getdoc(annotation) or "").split("\n\n")[0])
            for f in fields:
                default = getattr(param.default, f.name)
                _add_argument(group, f.name, field_hints[f.name], default, dest=f"{name}.{f.name}")
            groups[name] = (annotation, [f.name for f in fields])
        else:
            _add_argument(parser, name, annotation, param.default, param_kind=param.kind)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    parser.set_defaults(_fn=fn, _groups=groups, _name=f"{prefix} {command}" if prefix else command)


def _add_group(subparsers, group: str, fns: list[Callable]) -> None:
    """``blip2 GROUP COMMAND``: one subcommand per function (``group_command``)."""
    names = [command_name(fn).removeprefix(f"{group}-") for fn in fns]
    parser = subparsers.add_parser(group, help=f"{' | '.join(names)} (blip2 {group} COMMAND --help)",
                                   description=f"blip2 {group} {'|'.join(names)}: see each one's --help.")
    commands_of_group = parser.add_subparsers(title=f"{group} commands", metavar="COMMAND", required=True)
    for fn in fns:
        _add_command(commands_of_group, fn, group)


def _regroup(args: dict) -> dict:
    """Rebuild dataclass parameters from their fields' options."""
    for name, (cls, fields) in args.pop("_groups").items():
        args[name] = cls(**{f: args.pop(f"{name}.{f}") for f in fields})
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for entry in commands.COMMANDS:
        if isinstance(entry, tuple):
            _add_group(subparsers, *entry)
        else:
            _add_command(subparsers, entry)
    return parser


def _positional_values(fn: Callable, args: dict, name: str) -> list:
    """The values of ``fn``'s positional-only parameters, each given as a positional argument or as its --option."""
    values = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind is not param.POSITIONAL_ONLY:
            continue
        value, spelled = args.pop(param.name), args.pop(f"{param.name}{OPTION_SPELLING}", None)
        if spelled is not None and value != param.default and value != spelled:
            raise InputError(f"{param.name.upper()} given twice ({value!r} and --{param.name} {spelled!r}): give one")
        values.append(spelled if spelled is not None else value)
    return values


def _check_utf8(args: dict) -> None:
    """Text that is not UTF-8 (a byte the terminal could not decode) is refused by name, before any work."""
    for key, value in args.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "backslashreplace").decode()
                    raise InputError(f"--{key.replace('_', '-')} is not UTF-8 text ({shown}): retype it") from None


def configure_logging(level: str) -> None:
    """Messages of the library (the trainer's "saved", "resumed from") on stderr as "blip2.train: ..."."""
    logging.basicConfig(level=LOG_LEVELS[level], format="%(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger().setLevel(logging.WARNING)  # other libraries: warnings only
    logging.getLogger("blip2").setLevel(LOG_LEVELS[level])


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn, name = args.pop("_fn"), args.pop("_name")
    quiet, verbose = args.pop("quiet"), args.pop("verbose")
    configure_logging("quiet" if quiet else "verbose" if verbose else "normal")
    try:
        _check_utf8(args)
        positional = _positional_values(fn, args, name)
        args = _regroup(args)  # a dataclass option may reject its values
        result = fn(*positional, **args)
    except commands.USER_ERRORS as err:
        print(f"blip2 {name}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
