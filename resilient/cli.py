"""The ``resilient`` command: ``demo``, ``bench`` and ``availability``.

Each subcommand lives in its own module, imported only when it runs, so ``resilient --help`` is
instant and the optional extras (rich, the peers, matplotlib) are needed only by what uses them.

Example::

    $ resilient demo --duration 20
    $ resilient bench crash gray --json results.json
    $ resilient availability --lam 0.5 --mu 4.5 --replicas 3 --attempts 3
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

__all__ = ["main"]

#: subcommand -> (module, one-line help)
COMMANDS = {
    "demo": (
        "resilient._demo",
        "watch a faulty local fleet served by plain httpx and by resilient",
    ),
    "bench": ("resilient._bench", "run the benchmark scenarios beside the peers"),
    "availability": ("resilient.availability", "the Markov availability model of a fleet"),
}


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, _Command]]:
    parser = argparse.ArgumentParser(
        prog="resilient", description="Resilience for Python services that call other services."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    loaded: dict[str, _Command] = {}
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = cast(_Command, importlib.import_module(module_name))
            module.add_arguments(command_parser)
            loaded[name] = module
    return parser, loaded


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``resilient`` command line; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser, loaded = _parser(arguments)
    args = parser.parse_args(arguments)
    command = loaded.get(args.command)
    if command is None:  # pragma: no cover - argparse requires a known command
        parser.error(f"unknown command {args.command!r}")
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
