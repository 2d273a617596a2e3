"""What each policy costs a call that succeeds: resilient beside the peers, measured in one run.

The measuring lives in :mod:`resilient._bench_overhead`, so the installed command runs the same
program (``resilient bench overhead``); this script is kept for ``make bench`` and for habit.

Run::

    python benchmarks/overhead.py                       # the table, then the targets
    python benchmarks/overhead.py --check               # exit 1 when a target is missed
    python benchmarks/overhead.py --quick --json out.json
"""

from __future__ import annotations

import sys

from resilient._bench_overhead import STACKS, TARGETS, check_targets, main, render, run_all

__all__ = ["STACKS", "TARGETS", "check_targets", "main", "render", "run_all"]

if __name__ == "__main__":
    sys.exit(main())
