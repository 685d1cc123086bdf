"""The ``binserve`` command line: one subcommand per job, each registered by the module that owns it.

binserve make-tiny-model /tmp/tiny
binserve generate --model /tmp/tiny --prompt "Hello" --max-tokens 16 --json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Each entry registers one subcommand on the parser and sets ``func`` (args -> exit code).
# Imports stay inside the registrars' commands so `binserve --help` does not load torch or ray.
Registrar = Callable[[argparse._SubParsersAction], None]


def _registrars() -> list[Registrar]:
    from bench.sim import cli as sim_cli
    from tools import commands, model_cli, serve_cli, status
    from tools.predictor import cli as predictor_cli

    return [
        commands.register,
        model_cli.register,
        predictor_cli.register,
        sim_cli.register,
        serve_cli.register,
        status.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        # Bad input found past argparse (a field out of range, a missing model directory): a usage error.
        parser.exit(2, f"binserve {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
