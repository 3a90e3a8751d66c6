"""The one training loop: every recipe trains through :func:`fit` (the foundation's contrastive
ViT and language model, the public start's alignment stage, a hospital's local training with or
without DP-SGD). What differs between them is what the caller gives it: the batches, the loss of
a batch, the optimizer (Opacus' ``DPOptimizer`` for DP) and the schedule."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from tqdm import tqdm


def sampled_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``n`` examples, drawn with replacement (pretraining's sampler)."""
    while True:
        yield torch.randint(n, (batch_size,), generator=generator)


class Fitted(NamedTuple):
    steps: int              # optimizer steps taken
    losses: list[float]     # each batch's loss, in order


def fit(batches: Iterable, step_loss: Callable[[object], Optional[float]], optimizer: torch.optim.Optimizer,
        scheduler, steps: int, *, desc: str, progress: bool = True,
        after_step: Optional[Callable[[], None]] = None) -> Fitted:
    """The one training loop: ``steps`` optimizer steps over ``batches`` (passed over again and again
    until done). ``step_loss(batch)`` computes the batch's loss and its gradients (``backward``) and
    returns the loss (None for a batch without examples). A DP optimizer that only accumulates a
    physical batch into a larger logical one (Opacus' ``_is_last_step_skipped``) does not count as a
    step."""
    losses: list[float] = []
    done = 0
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    try:
        while done < steps:
            for batch in batches:
                loss = step_loss(batch)
                if loss is not None:
                    losses.append(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if getattr(optimizer, "_is_last_step_skipped", False):
                    continue  # a physical batch inside a larger logical batch
                scheduler.step()
                if after_step is not None:
                    after_step()
                done += 1
                bar.update(1)
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if done >= steps:
                    break
    finally:
        bar.close()
    return Fitted(done, losses)
