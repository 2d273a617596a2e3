"""What the benchmark programs share: ``benchmarks/*.py`` and ``resilient bench`` (overhead too).

Only the harness lives here: how an error is told in a cell, the environment every report starts
with (the JSON head and the one-line banner), the common command-line flags, the plain-text tables,
the target verdict lines, the ``--json`` file and the ``--check`` exit status. What each benchmark
measures, and how, stays in its own module: the timing loops are inlined there on purpose.

Example::

    parser = argument_parser(__doc__, quick_help="short repeats: a smoke test")
    args = parser.parse_args(["--quick"])
    print(banner(f"resilient {installed_version()}"))
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "Judged",
    "TargetResult",
    "argument_parser",
    "banner",
    "calibrated",
    "describe",
    "environment",
    "exit_status",
    "first_line",
    "installed_version",
    "installed_versions",
    "progress_printer",
    "table",
    "targets_json",
    "verdict_line",
    "write_json",
]


# -- errors ----------------------------------------------------------------------------------------


def first_line(text: str) -> str:
    """The first line of ``text`` once stripped ("" for blank text).

    Example::

        first_line("  refused\\nmore detail") == "refused"
    """
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def describe(exc: BaseException) -> str:
    """An exception as a table footnote: its class name and the first line of its message.

    Example::

        describe(ValueError("bad\\nvalue")) == "ValueError: bad"
        describe(TimeoutError()) == "TimeoutError"
    """
    text = first_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- environment -----------------------------------------------------------------------------------


def installed_version(name: str = "resilient") -> str | None:
    """The installed version of the distribution ``name``, None when it is not installed.

    Example::

        installed_version("httpx")   # "0.27.2"
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """`installed_version` of each of ``names``, in order.

    Example::

        installed_versions(("resilient", "tenacity"))   # {"resilient": "0.1.0", "tenacity": None}
    """
    return {name: installed_version(name) for name in names}


def environment() -> dict[str, str]:
    """The head of every benchmark's JSON: ``python``, ``implementation`` and ``platform``.

    Example::

        {**environment(), "quick": True}
    """
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def banner(what: str) -> str:
    """The first line of a report: ``what`` and the interpreter and platform it runs on.

    Example::

        banner("resilient 0.1.0")   # "resilient 0.1.0 on CPython 3.11.7, Linux-6.1-x86_64"
    """
    return (
        f"{what} on {platform.python_implementation()} "
        f"{sys.version.split()[0]}, {platform.platform()}"
    )


# -- command line ----------------------------------------------------------------------------------


def argument_parser(doc: str | None, *, quick_help: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--quick``, ``--json PATH``, ``--check``.

    The caller adds its own options after these (``--verbose`` among them, with its own help).

    Example::

        parser = argument_parser(__doc__, quick_help="short repeats: a smoke test")
        parser.add_argument("--verbose", action="store_true", help="say what is being measured")
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return parser


def progress_printer(verbose: bool) -> Callable[[str], None] | None:
    """With ``--verbose``, a callback that says on stderr what is being measured; else None.

    Example::

        progress = progress_printer(args.verbose)
    """
    if not verbose:
        return None

    def progress(what: str) -> None:
        print(f"  measuring {what}", file=sys.stderr)

    return progress


def unwritable(path: str) -> str | None:
    """Why a file could not be written at ``path`` (None: it can), checked before a long run.

    Example::

        unwritable("/nonexistent/out.json")  # "no such directory: /nonexistent"
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a directory"
    if not os.path.isdir(directory):
        return f"no such directory: {directory}"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` as indented JSON and a final newline (``--json``).

    Example::

        write_json("out.json", to_json(rows, results, settings, quick))
    """
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


class Judged(Protocol):
    """A target's result that says whether it passed."""

    @property
    def passed(self) -> bool: ...


T = TypeVar("T")


@dataclasses.dataclass
class TargetResult(Generic[T]):
    """One target (a benchmark's own frozen dataclass) and what was measured for it.

    Example::

        TargetResult(target, 7.2, passed=7.2 <= target.limit)
    """

    target: T
    value: float | None
    passed: bool
    error: str | None = None


def targets_json(results: Iterable[TargetResult[Any]]) -> list[dict[str, Any]]:
    """The targets for ``--json``: each target's fields, then value, pass and error.

    Example::

        data["targets"] = targets_json(check_targets(rows))
    """
    return [
        {**dataclasses.asdict(r.target), "value": r.value, "pass": r.passed, "error": r.error}
        for r in results
    ]


def exit_status(check: bool, results: Iterable[Judged]) -> int:
    """1 when ``--check`` is on and a target was missed, else 0.

    Example::

        return exit_status(args.check, check_targets(rows))
    """
    return 1 if check and not all(r.passed for r in results) else 0


# -- reporting -------------------------------------------------------------------------------------


def table(
    header: Sequence[str], body: Sequence[Sequence[str] | None], *, left: int = 1
) -> list[str]:
    """A plain-text table: the first ``left`` columns left-aligned, the others right-aligned,
    a rule under the header and at the end; a None in ``body`` draws a rule there too.

    Example::

        print("\\n".join(table(["what", "ms"], [["first", "1.5"], None, ["second", "12.0"]])))
    """
    widths = [len(h) for h in header]
    for cells in body:
        if cells is not None:
            widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        ljust = (c.ljust(w) for c, w in zip(cells[:left], widths[:left], strict=True))
        rjust = (c.rjust(w) for c, w in zip(cells[left:], widths[left:], strict=True))
        return "  ".join([*ljust, *rjust]).rstrip()

    rule = "-" * len(fmt(["-" * w for w in widths]))
    return [fmt(header), rule, *(rule if cells is None else fmt(cells) for cells in body), rule]


def verdict_line(passed: bool | str, name: str, shown: str) -> str:
    """A line under ``TARGETS``: PASS or FAIL (``passed``, or a verdict given as text), the
    target's name, then ``shown`` (the value and its limit, or why there is none).

    Example::

        verdict_line(True, "p99 <= 30 ms", "12.5 ms (limit 30 ms)")
        # "  PASS  p99 <= 30 ms: 12.5 ms (limit 30 ms)"
    """
    verdict = passed if isinstance(passed, str) else "PASS" if passed else "FAIL"
    return f"  {verdict}  {name}: {shown}"


# -- timing ----------------------------------------------------------------------------------------


def calibrated(n: int, elapsed_ns: int, target_ns: int) -> int | None:
    """The number of calls that takes about ``target_ns``, once ``n`` calls took ``elapsed_ns``;
    None while the run was too short to tell (under ``target_ns / 8``): double ``n`` and retry.

    Example::

        n = 1
        while (found := calibrated(n, timed(n), 50_000_000)) is None:
            n *= 2
    """
    if elapsed_ns < target_ns // 8:
        return None
    return max(1, round(n * target_ns / max(elapsed_ns, 1)))
