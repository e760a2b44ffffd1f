"""``blip2 <command>``: each command is one typed function in ``blip2.commands``; its docstring is its help.

The parser is derived from the function's signature: positional parameters become positional arguments,
keyword parameters become ``--options`` (``bool`` ones become flags, ``list[...]`` ones take several values).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable

from blip2 import commands


def _option_type(annotation) -> tuple[Callable | None, bool]:
    """(converter, takes several values) for a type hint such as ``int``, ``str | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return (args[0] if args else str), True
    if args:  # Optional[X] / X | None
        return _option_type(args[0])
    return (annotation if annotation in (int, float, str) else None), False


def _add_command(subparsers, fn: Callable) -> None:
    doc = inspect.getdoc(fn) or ""
    summary = doc.splitlines()[0] if doc else ""
    parser = subparsers.add_parser(
        fn.__name__.replace("_", "-"), help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind, many = _option_type(hints.get(name, str))
        if param.default is inspect.Parameter.empty:
            parser.add_argument(name, type=kind, nargs="+" if many else None)
        elif hints.get(name) is bool:
            flag = f"--{name.replace('_', '-')}"
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=param.default)
        else:
            parser.add_argument(
                f"--{name.replace('_', '-')}", dest=name, type=kind, nargs="+" if many else None, default=param.default,
                help=f"(default: {param.default})",
            )
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for fn in commands.COMMANDS:
        _add_command(subparsers, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    try:
        result = fn(**args)
    except commands.USER_ERRORS as err:
        print(f"blip2 {fn.__name__.replace('_', '-')}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
