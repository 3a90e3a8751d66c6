"""Does the fusion carry a finding? A linear probe on what the fusion hands the language model.

For each yes/no question type of the data (``--qtypes`` to choose), a linear classifier (ridge
regression on the answers as +1 / -1, closed form) on the layer-normed mean of the fusion's output
tokens (what a ``tags`` stage's head reads: medvlm.tags.token_summary) is fitted to the training images'
answers and scored on the validation images', every hospital's together, against the validation
majority. A probe above the majority while the model's own answers sit at it places the loss in the
language model's reading, not in what the fusion sees (docs/benchmarks.md, "Where the pacemaker is lost"). The trainable state probed is the config's
start (``model.init``: the public start by default) or an exported folder, e.g. a federation's
``global/``:

    python -m benchmarks.probe --config tiny-consortium-tags [--init runs/x/global] [--qtypes device]
        [overrides ...]
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch


def yes_no_labels(tag_sets: Sequence[set[str]], kind: str) -> tuple[list[int], torch.Tensor]:
    """(image indices, 1.0 for yes / 0.0 for no) of the images asked ``kind`` as yes/no."""
    index = [i for i, tags in enumerate(tag_sets) if f"{kind}=yes" in tags or f"{kind}=no" in tags]
    return index, torch.tensor([float(f"{kind}=yes" in tag_sets[i]) for i in index])


def yes_no_kinds(tag_sets: Sequence[set[str]]) -> list[str]:
    """The question types every one of whose answers is yes or no, sorted."""
    answers: dict[str, set[str]] = {}
    for tags in tag_sets:
        for tag in tags:
            kind, _, answer = tag.rpartition("=")
            answers.setdefault(kind, set()).add(answer)
    from medvlm.tags import YES_NO

    return sorted(k for k, a in answers.items() if a <= YES_NO.keys())


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1.0):
    """A ridge-regression classifier on (N, D) features (closed form: least squares on the answers as
    +1 / -1 with an L2 penalty ``ridge``, intercept unpenalised); returns a function features -> yes."""
    if len(y) == 0:
        raise ValueError("probe: no training images carry the answer; choose another question type")
    x, target = x.double(), 2 * y.double() - 1
    mean, offset = x.mean(0), target.mean()
    xc = x - mean
    w = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (target - offset))
    return lambda features: (features.double() - mean) @ w + offset > 0


@torch.no_grad()
def fusion_summary(model, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """What a tag head reads of the fusion's output for frozen patch tokens (N, P, D)."""
    from medvlm.tags import token_summary

    device = next(model.fusion.parameters()).device
    return torch.cat([token_summary(model.fusion(tokens[i:i + batch_size].to(device).float())).cpu()
                      for i in range(0, len(tokens), batch_size)])


def probe(model, train, val, qtypes: Sequence[str] | None = None) -> dict[str, dict]:
    """Per yes/no question type: probe accuracy, validation majority and image counts (frozen-feature
    splits: ``medvlm.features.with_frozen_features``)."""
    from medvlm.tags import image_tags

    tags = {"train": image_tags(train), "val": image_tags(val)}
    known = yes_no_kinds(tags["train"])
    kinds = list(qtypes) if qtypes else known
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"probe: {unknown} are not yes/no question types of the training images "
                         f"(yes/no types here: {known})")
    features = {"train": fusion_summary(model, train.pixels), "val": fusion_summary(model, val.pixels)}
    out = {}
    for kind in kinds:
        (i_tr, y_tr), (i_va, y_va) = yes_no_labels(tags["train"], kind), yes_no_labels(tags["val"], kind)
        if len(i_va) == 0:
            raise ValueError(f"probe: no validation image is asked {kind!r}")
        predict = fit_probe(features["train"][i_tr], y_tr)
        yes = y_va.mean().item()
        out[kind] = {"probe": (predict(features["val"][i_va]) == y_va.bool()).double().mean().item(),
                     "majority": max(yes, 1 - yes), "train_images": len(i_tr), "val_images": len(i_va)}
    return out


def main(argv=None) -> None:
    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.dataset import load_splits
    from medvlm.features import with_frozen_features
    from medvlm.runs import load_trainable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-consortium-tags")
    parser.add_argument("--init", help="an exported trainable folder (a run's global/); default: the config's start")
    parser.add_argument("--qtypes", help="comma-separated yes/no question types (default: every one)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        model = build_medvlm(cfg.model, seed=cfg.federation.seed)
        if args.init:
            load_trainable(model, args.init)
        splits = load_splits(cfg.data, model.vision.preprocess)
        train, val = (with_frozen_features(model, splits[k]) for k in ("train", "val"))
        result = probe(model, train, val, args.qtypes.split(",") if args.qtypes else None)
    except (ValueError, FileNotFoundError) as err:   # a bad preset, override, --init folder or --qtypes
        parser.exit(2, f"benchmarks.probe: {err}\n")
    print(f"linear probe on the fusion's token mean ({args.init or 'the config start'}; {args.config} "
          f"{' '.join(args.overrides)}): accuracy (%) on every hospital's validation images")
    print(f"{'question type':20s} {'probe':>6s} {'majority':>9s} {'train img':>10s} {'val img':>8s}")
    for kind, r in result.items():
        print(f"{kind:20s} {100 * r['probe']:6.1f} {100 * r['majority']:9.1f} {r['train_images']:10d} "
              f"{r['val_images']:8d}")


if __name__ == "__main__":
    main()
