"""DP overhead: a local training step with DP-SGD against the same step without DP, side by side.

Same model, data, logical batch and optimizer; each variant runs in a fresh subprocess so its
peak memory is its own (CPU: peak resident set size of the process; GPU: peak allocated memory).
Time per step excludes set-up (model build, Opacus wrapping) and the first steps (warm-up).

    python -m benchmarks.dp_overhead [--steps 30] [--repeats 2] [--modes hooks,ghost] [--size tiny|gpu] [overrides ...]

The logical batch is the preset's (train.batch_size, 64); pass train.batch_size=32
train.physical_batch_size=32 to see a smaller one (the fixed per-step cost of DP weighs more).

``--size gpu`` builds the GPU-sized model from config with random weights: a ViT-B/16-shaped
encoder (open_clip) and a ~1B-parameter Llama-shaped LM (hidden 2048, 16 layers), bf16 base
weights, on CUDA. It needs an accelerator and is not run on the CPU-only machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = ("hooks", "functorch", "ew", "ghost")


def write_llama(directory: Path, *, hidden: int, layers: int, heads: int, intermediate: int) -> str:
    """A random Llama-shaped causal LM directory (config + weights + the built-in tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medvlm.model.language import load_tokenizer
    from medvlm.recipes.foundation import ensure_foundation

    tokenizer = load_tokenizer(str(ensure_foundation("tiny") / "lm"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def gpu_sized_overrides(tmp: Path) -> list[str]:
    from benchmarks.feature_cache import write_vit_b16

    lm = write_llama(tmp / "llama-1b", hidden=2048, layers=16, heads=16, intermediate=5632)
    return [f"model.vision.source={write_vit_b16(tmp / 'vit-b-16')}", f"model.language.source={lm}",
            "model.language.dtype=bfloat16", "model.init=random", "model.fusion.dim=256", "model.fusion.heads=8",
            "model.fusion.num_queries=32", "model.max_text_len=48", "train.device=cuda",
            "train.batch_size=64", "train.physical_batch_size=32"]


def one_variant(mode: str, steps: int, overrides: list[str]) -> dict:
    """Runs in the subprocess: build, train ``steps`` logical steps, report time/step and peak memory."""
    from dataclasses import replace

    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.dataset import load_splits
    from medvlm.features import with_frozen_features
    from medvlm.train import resolve_device, train_local

    cfg = load_config("tiny", overrides)
    device = resolve_device(cfg.train.device)
    model = build_medvlm(cfg.model, seed=0).to(device)
    data = with_frozen_features(model, load_splits(cfg.data, model.vision.preprocess, hospitals=["general"])["train"])
    privacy = replace(cfg.privacy, enabled=mode != "plain", target_epsilon=None, noise_multiplier=1.0,
                      grad_sample_mode=mode if mode != "plain" else "hooks")
    train = replace(cfg.train, epochs=1000.0)   # steps are capped below
    warm = max(3, steps // 5)
    train_local(model, data, train=train, privacy=privacy, max_steps=warm, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = train_local(model, data, train=train, privacy=privacy, max_steps=steps, progress=False)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "seconds_per_step": result.metrics["seconds"] / result.metrics["steps"],
            "samples_per_s": result.metrics["samples_seen"] / result.metrics["seconds"],
            "peak_bytes": peak, "device": str(device), "batch": cfg.train.batch_size,
            "trainable": sum(p.numel() for p in model.trainable_parameters().values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="best of N subprocesses per variant")
    parser.add_argument("--modes", default="hooks,functorch,ew,ghost", help=f"Opacus modes among {MODES}")
    parser.add_argument("--size", choices=["tiny", "gpu"], default="tiny")
    parser.add_argument("--variant", help=argparse.SUPPRESS)     # internal: run one variant, print JSON
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(one_variant(args.variant, args.steps, args.overrides)))
        return
    if args.size == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs a CUDA device; this machine has none (the tiny size runs anywhere)")
    with tempfile.TemporaryDirectory() as tmp:
        base = ["data.images_per_hospital=200"]
        overrides = base + (gpu_sized_overrides(Path(tmp)) if args.size == "gpu" else []) + list(args.overrides)
        rows = []
        modes = ["plain", *args.modes.split(",")]
        results: dict[str, list] = {m: [] for m in modes}
        for _ in range(args.repeats):        # interleaved, so drift on a shared machine hits all alike
            for mode in modes:
                cmd = [sys.executable, "-m", "benchmarks.dp_overhead", "--variant", mode, "--steps",
                       str(args.steps), *overrides]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    error = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    results[mode].append({"mode": mode, "error": error[:150]})
                else:
                    results[mode].append(json.loads(line[len("RESULT "):]))
        for mode in modes:
            good = [r for r in results[mode] if "error" not in r]
            rows.append(min(good, key=lambda r: r["seconds_per_step"]) if good else results[mode][0])
    plain = rows[0]
    if "error" in plain:
        raise SystemExit(f"the plain (no DP) step failed: {plain['error']}")
    device = plain["device"] + (f" ({torch.cuda.get_device_name()})" if plain["device"].startswith("cuda") else "")
    print(f"DP overhead, {args.size} model ({plain['trainable']:,} trainable parameters), logical batch "
          f"{plain['batch']}, {args.steps} steps, best of {args.repeats}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{device}")
    print(f"{'variant':14s}{'s/step':>9s}{'samples/s':>11s}{'peak MiB':>10s}{'time vs plain':>15s}"
          f"{'memory vs plain':>17s}")
    for row in rows:
        name = "no DP" if row["mode"] == "plain" else f"DP {row['mode']}"
        if "error" in row:
            print(f"{name:14s}  failed: {row['error']}")
            continue
        print(f"{name:14s}{row['seconds_per_step']:9.3f}{row['samples_per_s']:11.1f}{row['peak_bytes'] / 2**20:10.0f}"
              f"{row['seconds_per_step'] / plain['seconds_per_step']:14.2f}x"
              f"{row['peak_bytes'] / plain['peak_bytes']:16.2f}x")
    goal = 1.2 if args.size == "gpu" else 1.3
    best = min((r for r in rows[1:] if "error" not in r), key=lambda r: r["seconds_per_step"], default=None)
    if best:
        ratio = best["seconds_per_step"] / plain["seconds_per_step"]
        print(f"best DP mode: {best['mode']} at {ratio:.2f}x the plain step (goal <= {goal}x: "
              f"{'met' if ratio <= goal else 'not met'})")


if __name__ == "__main__":
    main()
