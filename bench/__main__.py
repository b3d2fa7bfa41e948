"""Run the benchmarks: `python -m bench [NAME...]` (NAME is a module suffix, e.g. `polling`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run every bench_*.py module (or the named ones) in turn; return the worst exit code."""
    here = Path(__file__).parent
    names = sorted(info.name for info in pkgutil.iter_modules([str(here)]) if info.name.startswith("bench_"))
    wanted = [f"bench_{name.removeprefix('bench_')}" for name in argv]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    worst = 0
    for name in wanted or names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        worst = max(worst, int(module.main([])))
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
