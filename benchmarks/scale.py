"""Scale: a simulated federation of many synthetic hospitals (default 100, 10 sampled per round)
through Flower's simulation engine (Ray), the same ServerApp/ClientApp as a deployment.

Prints the peak memory of the whole process tree (this process, Ray and its workers, sampled
every 0.25 s) and, per round, the training phase's wall time (sample -> train -> validate ->
aggregate; the federated evaluation and checkpoint after it are timed apart) against the slowest
sampled hospital's training time: overhead = (train wall - slowest training) / train wall. On a
machine with fewer cores than sampled hospitals the hospitals queue for cores, which that figure
counts as overhead (its floor is 1 - cores / sampled hospitals), so the table also gives the
overhead against the ideal schedule: (train wall - summed training / cores) / train wall.

    python -m benchmarks.scale [--hospitals 100] [--per-round 10] [--rounds 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.root, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=20, help="images per hospital")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from medvlm.data.synthetic import site_names
    from simulations.run import simulate

    fraction = args.per_round / args.hospitals
    overrides = [f"data.hospitals=[{','.join(site_names(args.hospitals))}]",
                 f"data.images_per_hospital={args.images}", f"federation.rounds={args.rounds}",
                 f"federation.fraction_train={fraction}", f"federation.fraction_evaluate={fraction}",
                 "federation.local_epochs=1", *args.overrides]
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        started = time.perf_counter()
        summary = simulate("tiny", overrides, run_dir=Path(tmp) / "run")
        wall = time.perf_counter() - started
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"{args.hospitals} hospitals, {args.per_round} sampled per round, {args.rounds} rounds, tiny model, "
          f"{args.images} images each; {workers} cores; total {wall:.0f} s")
    print(f"{'round':>5s}{'trained':>9s}{'round s':>9s}{'train s':>9s}{'slowest s':>11s}{'overhead':>10s}"
          f"{'sum train s':>13s}{'vs ideal':>10s}")
    overheads, ideal = [], []
    for r in records[1:]:
        seconds = [h["seconds"] for h in r["hospitals"].values() if h.get("status") == "trained"]
        if not seconds:
            continue
        slowest, total, wall = max(seconds), sum(seconds), r["train_seconds"]
        overheads.append((wall - slowest) / wall)
        ideal.append(max(0.0, wall - total / workers) / wall)
        print(f"{r['round']:5d}{len(seconds):9d}{r['seconds']:9.1f}{wall:9.1f}{slowest:11.2f}{overheads[-1]:9.0%}"
              f"{total:13.1f}{ideal[-1]:9.0%}")
    peak = memory.peak / 2**30
    print(f"peak memory (process tree): {peak:.2f} GiB (goal <= 8 GiB: {'met' if peak <= 8 else 'not met'})")
    mean, mean_ideal = sum(overheads) / max(1, len(overheads)), sum(ideal) / max(1, len(ideal))
    floor = max(0.0, 1 - workers / args.per_round)
    print(f"mean round overhead: {mean:.0%} (goal <= 10%: {'met' if mean <= 0.10 else 'not met'}; with {workers} "
          f"cores for {args.per_round} hospitals its floor is {floor:.0%}); against the ideal schedule: "
          f"{mean_ideal:.0%}")
    print(f"final accuracy {summary['final_accuracy']:.3f} vs baseline {summary['baseline_accuracy']:.3f}")


if __name__ == "__main__":
    main()
