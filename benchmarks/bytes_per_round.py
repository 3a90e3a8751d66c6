"""Bytes per round: what crosses the wire per hospital per round, against the physical limit
(parameters sent x bytes per element) and against the whole model, for each transport with and
without FFA-LoRA, side by side. Measured on real messages of a one-round federation (the real
ServerApp loop and ClientApp handlers, in process): the serialised arrays, headers included.

    python -m benchmarks.bytes_per_round [overrides ...]

Bytes depend on shapes only, so the default runs the tiny architecture with random weights; pass
model.* overrides for another architecture.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "int8": 1}
VARIANTS = [(t, ffa) for ffa in (False, True) for t in ("fp32", "bf16", "int8")]


def measure(transport: str, ffa: bool, overrides: list[str], tmp: Path) -> dict:
    from simulations.inprocess import run_inprocess

    run_dir = tmp / f"{transport}-{ffa}"
    extra = [f"federation.transport={transport}", f"model.lora.ffa={str(ffa).lower()}"]
    summary = run_inprocess("tiny", overrides + extra, run_dir)
    record = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    ups = [h["bytes_up"] for h in record["hospitals"].values()]
    return {"sent": summary["trainable_parameters"], "up": sum(ups) / len(ups),
            "down": record["bytes_down"] / len(ups)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from medvlm.build import build_medvlm
    from medvlm.config import load_config

    overrides = ["model.init=random", "model.vision.source=builtin:tiny-random",
                 "model.language.source=builtin:tiny-random", "data.hospitals=[general,oncology]",
                 "data.images_per_hospital=20", "federation.rounds=1", "federation.local_epochs=1",
                 "federation.fraction_evaluate=0", "privacy.enabled=false", *args.overrides]
    model = build_medvlm(load_config("tiny", overrides).model)
    total = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        rows = {(t, ffa): measure(t, ffa, overrides, Path(tmp)) for t, ffa in VARIANTS}
    full_lora = rows[("fp32", False)]["up"]
    print(f"bytes per hospital per round; model {total:,} parameters ({total * 4 / 2**20:.1f} MiB in fp32)")
    print(f"{'transport':10s}{'FFA':>5s}{'params sent':>13s}{'up bytes':>11s}{'down bytes':>12s}{'limit':>10s}"
          f"{'up/limit':>10s}{'vs fp32 LoRA':>14s}{'vs model':>10s}")
    for (t, ffa), r in rows.items():
        limit = r["sent"] * BYTES_PER_ELEMENT[t]
        print(f"{t:10s}{'yes' if ffa else 'no':>5s}{r['sent']:13,d}{r['up']:11,.0f}{r['down']:12,.0f}{limit:10,d}"
              f"{r['up'] / limit:9.3f}x{full_lora / r['up']:13.2f}x{total * 4 / r['up']:9.0f}x")
    worst = max(r["up"] / (r["sent"] * BYTES_PER_ELEMENT[t]) for (t, _), r in rows.items())
    print(f"worst measured/limit: {worst:.3f}x (goal <= 1.05x: {'met' if worst <= 1.05 else 'not met'}); "
          "the excess is the packed state's index (names, dtypes, shapes) and its one .npy header")


if __name__ == "__main__":
    main()
