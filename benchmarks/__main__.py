"""Run the benchmarks one after another and print their tables (each measures its variants side by
side in one run; see docs/benchmarks.md for the figures of the reference machine).

    python -m benchmarks                 # all of them (about 25 min on 2 CPU cores)
    python -m benchmarks bytes dp        # some of them
    python -m benchmarks --list

GPU-sized figures: ``python -m benchmarks.dp_overhead --size gpu`` on a machine with CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "bytes": ("benchmarks.bytes_per_round", []),
    "dp": ("benchmarks.dp_overhead", []),
    "cache": ("benchmarks.feature_cache", []),
    "memory": ("benchmarks.site_memory", []),
    "utility": ("benchmarks.utility", []),
    "scale": ("benchmarks.scale", []),
    "wire": ("benchmarks.wire", []),
    "probe": ("benchmarks.probe", []),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"any of {list(BENCHMARKS)} (default: all)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, (module, _) in BENCHMARKS.items():
            print(f"{name:8s} python -m {module}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}: choose from {list(BENCHMARKS)}")
    failed = []
    for name in args.names or list(BENCHMARKS):
        module, extra = BENCHMARKS[name]
        print(f"\n=== {name}: python -m {module} ===", flush=True)
        started = time.perf_counter()
        # tables on stdout; the federations' logs (stderr) are left out of the report
        result = subprocess.run([sys.executable, "-m", module, *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        print("\n".join(_tables(result.stdout)))
        if result.returncode != 0:
            failed.append(name)
            print(f"{name} failed (exit {result.returncode}):\n" + "\n".join(result.stderr.splitlines()[-15:]))
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {failed}")
    return 1 if failed else 0


def _tables(stdout: str) -> list[str]:
    """The benchmark's own report: everything after the federations' live round tables."""
    lines = stdout.splitlines()
    live = [i for i, x in enumerate(lines) if x.startswith("round  accuracy")]
    if live:   # the live per-round tables of the federations run inside come first
        start = live[-1] + 1
        while start < len(lines) and lines[start].startswith(" "):
            start += 1
        return lines[start:]
    return lines


if __name__ == "__main__":
    sys.exit(main())
