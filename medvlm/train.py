"""Local training of the trainable state (LoRA + fusion), with DP-SGD through Opacus.

Through the one training loop (:func:`medvlm.loop.fit`): Poisson-sampled logical batches, split
into physical batches by Opacus' ``BatchMemoryManager``, per-example clipping + Gaussian noise in
the ``DPOptimizer``. The accountant's history is passed in and handed back, so a caller (a
hospital, once per federation round) keeps spending accumulating across calls and restarts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import DataLoader

from medvlm.config import PrivacyConfig, TrainConfig
from medvlm.data.dataset import VQADataset, VQARows
from medvlm.features import with_frozen_features
from medvlm.loop import fit
from medvlm.model.vlm import MedVLM, sequence_loss
from medvlm.privacy import PrivacySpent, calibrate_noise, epsilon
from medvlm.quiet import ACCOUNTING, DP_TRAINING, quiet

if TYPE_CHECKING:
    from medvlm.audit import GradientCanaries
    from medvlm.tags import TagHead

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]        # the new trainable state (CPU tensors)
    metrics: dict                         # aggregate only: loss, steps, examples, seconds
    privacy: Optional[PrivacySpent]       # None when DP is off
    accountant_state: Optional[dict] = field(default=None)  # {"mechanism", "history"} to persist


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):   # torch names every backend it was ever built for
        raise ValueError(f"train.device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={name!r} but Apple's MPS is not available here; use train.device=cpu or auto")
    return device


def _secret_seed() -> int:
    """64 bits from the OS's entropy for DP's batches and noise (a test may pin it; nothing else does)."""
    return secrets.randbits(64)


def planned_steps(num_examples: int, train: TrainConfig) -> tuple[float, int]:
    """(sample rate, optimizer steps) for ``train.epochs`` passes at the expected batch size.

    The sample rate is the one Opacus' accountant records, so what a ledger plans with is exactly
    what it charges. Opacus samples each example with probability q = 1 / ceil(N / batch), runs
    ``int(1 / q)`` batches an epoch and records 1 / that count, which floating point makes one batch
    fewer for some N (105 batches: int(1 / (1 / 105)) = 104, so the accountant records 1 / 104). That
    rate is at least the one sampled with, so planning with it keeps the guarantee (it errs safe)."""
    batches = int(1.0 / (1.0 / math.ceil(num_examples / train.batch_size)))   # Opacus' len(DPDataLoader)
    sample_rate = 1.0 / batches
    return sample_rate, max(1, math.ceil(train.epochs / sample_rate))


def lr_factor(steps: int, window: tuple[float, float] = (0.0, 1.0)):
    """The learning-rate factor of each of ``steps`` optimizer steps: a linear warm-up over the first
    5% and a cosine to 0, of which this call trains the ``window`` piece. (0, 1): the whole curve in
    these steps (the default, and the pooled model's). A federation whose rounds share one curve
    (``federation.lr_schedule=stage``) trains round k of n over ((k - 1) / n, k / n): the warm-up falls
    in its first round and each later round carries on where the last one stopped."""
    start, end = window
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"learning-rate window {window}: need 0 <= start < end <= 1")
    total = max(1, round(steps / (end - start)))      # the whole curve's steps at this call's pace
    offset = round(start * total)
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        step += offset
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def dp_records(data: VQARows, *, tags: bool = False) -> int:
    """How many DP records ``data`` holds: its question rows, or (a ``tags`` stage) its images, each
    with all its tags. A hospital plans its noise and sample rate with exactly this count."""
    if tags:
        return len(data.pixels) if data.pixels is not None else 0
    return len(data)


def _history(privacy: PrivacyConfig, accountant_state: Optional[dict]) -> list:
    """The accountant history a hospital has spent so far, refused if kept by another accountant."""
    if privacy.enabled and accountant_state and accountant_state.get("mechanism") != privacy.accountant:
        raise ValueError(f"accountant state is {accountant_state.get('mechanism')!r} but privacy.accountant="
                         f"{privacy.accountant!r}: keep one accountant for a hospital's whole history")
    return list((accountant_state or {}).get("history", []))


def calibrated(privacy: PrivacyConfig, num_examples: int, train: TrainConfig, *,
               accountant_state: Optional[dict] = None, max_steps: Optional[int] = None) -> PrivacyConfig:
    """``privacy`` with the noise multiplier that brings the spending in ``accountant_state`` plus this
    training (``num_examples`` at ``train``'s batch size and epochs, at most ``max_steps`` steps) to
    ``privacy.target_epsilon``; unchanged when DP is off or no target is set. Raises
    ``PrivacyBudgetExceeded`` when the target is already spent. (A federation's hospital plans its
    noise with its ledger instead: ``Ledger.plan_for``.)"""
    if not privacy.enabled or privacy.target_epsilon is None:
        return privacy
    sample_rate, steps = planned_steps(num_examples, train)
    steps = min(steps, max_steps) if max_steps else steps
    sigma = calibrate_noise(target_epsilon=privacy.target_epsilon, delta=privacy.delta, sample_rate=sample_rate,
                            steps=steps, accountant=privacy.accountant,
                            history=_history(privacy, accountant_state))
    return replace(privacy, target_epsilon=None, noise_multiplier=sigma)


def _noise_only_grads(params: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still is a DP-SGD step (noise only, counted by the accountant)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


@quiet(DP_TRAINING, ACCOUNTING)   # Opacus' and torch's notes on what we do on purpose (medvlm/quiet.py)
def train_local(model: MedVLM, data: VQARows, *, train: TrainConfig, privacy: PrivacyConfig,
                accountant_state: Optional[dict] = None, max_steps: Optional[int] = None,
                progress: bool = True, canaries: Optional["GradientCanaries"] = None,
                lr_window: tuple[float, float] = (0.0, 1.0), tags: Optional["TagHead"] = None) -> LocalResult:
    """Train ``model``'s trainable state on ``data``; returns the new state, metrics and privacy spent.
    ``canaries`` (an audit's gradient canaries) join each logical step as extra examples would.
    ``lr_window``: the piece of the warm-up + cosine curve these steps follow (:func:`lr_factor`).
    ``tags``: a hospital's stage 1 (:mod:`medvlm.tags`): the fusion and this head learn each image's
    tags instead of the answers' text; one image is one DP record, and the head is trained in place
    unless it is ``fixed`` (the caller keeps it; it is never part of the returned state)."""
    if len(data) == 0:
        raise ValueError("no training examples: the data set is empty")
    if tags is not None and set(train.trainable) != {"fusion"}:
        raise ValueError(f"a tags stage trains the fusion alone (train.trainable={train.trainable}): the tag head "
                         "reads the fusion's output, so LoRA would get no gradient; set the stage's trainable: [fusion]")
    if tags is not None and privacy.enabled and privacy.grad_sample_mode == "ghost":
        raise ValueError("a tags stage needs per-example gradients of the fusion and its head: use "
                         "privacy.grad_sample_mode=hooks, functorch or ew (ghost clipping is for the LM's loss)")
    lr_factor(1, lr_window)   # a malformed window is refused before anything is spent
    prior = _history(privacy, accountant_state)
    if privacy.enabled and (privacy.target_epsilon is not None or privacy.noise_multiplier is None):
        raise ValueError(f"train_local adds the noise multiplier it is given (privacy.noise_multiplier="
                         f"{privacy.noise_multiplier}); a target epsilon ({privacy.target_epsilon}) is turned into one "
                         "first: privacy = medvlm.train.calibrated(privacy, len(data), train, ...)")
    device = resolve_device(train.device)
    model.to(device)
    model.freeze_base(train.trainable)
    model.train()  # Opacus refuses eval-mode modules; the frozen vision tower stays in eval
    encoded = with_frozen_features(model, data)
    module: torch.nn.Module = model
    if tags is not None:
        from torch.utils.data import TensorDataset

        from medvlm.tags import Tagger, image_tags, tag_targets

        tags.to(device).train()
        tags.requires_grad_(not tags.fixed)
        module = Tagger(model.fusion, tags)
        dataset = TensorDataset(encoded.pixels, tag_targets(image_tags(encoded), tags.columns, tags.loss))
    else:
        dataset = VQADataset(encoded, model.tokenizer, model.cfg.max_text_len)
    sample_rate, steps = planned_steps(len(dataset), train)
    steps = min(steps, max_steps) if max_steps else steps
    named = {n: p for n, p in model.trainable_parameters().items() if p.requires_grad}
    if tags is not None:   # the head clips with the fusion (one record's whole gradient), canaries included
        named.update({f"tags.{n}": p for n, p in tags.named_parameters() if p.requires_grad})
    params = list(named.values())
    if canaries is not None and privacy.enabled and privacy.grad_sample_mode == "ghost":
        raise ValueError("gradient canaries need per-example gradients: use privacy.grad_sample_mode=hooks, "
                         "functorch or ew for an audit (ghost clipping never forms them)")
    inject = canaries.injector(named, sample_rate=sample_rate, batch_size=train.batch_size,
                               dp=privacy.enabled) if canaries is not None else None
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    # Without DP, train.seed makes a run repeatable. With DP, the Poisson batches and the noise must be
    # secret and fresh in every call: DP-SGD's guarantee assumes nobody can predict them. Drawn from
    # train.seed they were the same in every round and at every hospital, so the coordinator (who
    # knows the seed) could regenerate the noise and take it off an update, and the noise added up
    # across rounds instead of averaging out. So under DP both come from the OS's entropy.
    seed = _secret_seed() if privacy.enabled else train.seed
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(train.seed)

    engine = criterion = None
    net: torch.nn.Module = module
    noise = 0.0
    if privacy.enabled:
        from opacus import PrivacyEngine

        noise = float(privacy.noise_multiplier)
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=False)
        if prior:
            engine.accountant.load_state_dict({"mechanism": privacy.accountant, "history": list(prior)})
        made = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, loss_reduction="mean",
            grad_sample_mode=privacy.grad_sample_mode,
            noise_generator=torch.Generator(device=device).manual_seed(_secret_seed()),
            criterion=torch.nn.CrossEntropyLoss(ignore_index=-100))
        if privacy.grad_sample_mode == "ghost":
            net, optimizer, criterion, loader = made
        else:
            net, optimizer, loader = made
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, lr_window))

    net.train()
    totals = {"loss": 0.0, "seen": 0}

    def step_loss(batch) -> Optional[float]:
        if tags is not None:
            return tag_step(*batch)
        pixels, input_ids, attention_mask, labels = batch
        loss = None
        if len(pixels) == 0:
            _noise_only_grads(params)
        else:
            pixels, input_ids = pixels.to(device), input_ids.to(device)
            attention_mask, labels = attention_mask.to(device), labels.to(device)
            logits, targets = net(pixels, input_ids, attention_mask, labels)
            per_example = sequence_loss(logits.detach(), targets)
            if criterion is not None:   # ghost clipping: Opacus' criterion runs the backward
                objective = criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape)
            else:
                objective = sequence_loss(logits, targets).mean()
            objective.backward()
            total = per_example.sum().item()      # one device sync per batch
            totals["loss"] += total
            totals["seen"] += len(pixels)
            loss = total / len(pixels)
        if inject is not None:
            inject.add()
        return loss

    def tag_step(tokens, targets) -> Optional[float]:
        from medvlm.tags import tag_loss

        loss = None
        if len(tokens) == 0:
            _noise_only_grads(params)
        else:
            per_example = tag_loss(net(tokens.to(device)), targets.to(device), tags.loss)
            per_example.mean().backward()
            totals["loss"] += per_example.sum().item()
            totals["seen"] += len(tokens)
            loss = per_example.mean().item()
        if inject is not None:
            inject.add()
        return loss

    started = time.perf_counter()
    memory = (_batch_memory(loader, train.physical_batch_size, optimizer) if privacy.enabled
              else contextlib.nullcontext(loader))
    try:
        with memory as batches:
            done = fit(batches, step_loss, optimizer, scheduler, steps, progress=progress,
                       after_step=inject.stepped if inject is not None else None,
                       desc=("stage 1: tags" if tags is not None else "local training") +
                       (" (DP)" if privacy.enabled else "")).steps
    finally:
        if engine is not None and hasattr(net, "_close"):
            net._close()  # remove Opacus hooks so the model can be wrapped again next round
        for p in params:
            for attr in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    seen = totals["seen"]
    seconds = time.perf_counter() - started
    metrics = {"train_loss": totals["loss"] / max(seen, 1), "steps": done, "examples": len(dataset),
               "samples_seen": seen, "seconds": seconds}
    if inject is not None:
        metrics["canary_draws"] = inject.drawn
    spent, state = None, None
    if engine is not None:
        state = engine.accountant.state_dict()
        state = {"mechanism": state["mechanism"], "history": [tuple(h) for h in state["history"]]}
        total = sum(int(h[2]) for h in state["history"])
        spent = PrivacySpent(epsilon=epsilon(state["history"], delta=privacy.delta, accountant=privacy.accountant),
                             delta=privacy.delta, noise_multiplier=noise, sample_rate=sample_rate, steps=done,
                             total_steps=total, accountant=privacy.accountant, max_grad_norm=privacy.max_grad_norm)
        metrics["epsilon"] = spent.epsilon
    return LocalResult(model.trainable_state(), metrics, spent, state)


def _batch_memory(loader, max_physical: int, optimizer):
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    return BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer)
