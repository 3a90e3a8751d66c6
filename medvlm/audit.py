"""An empirical privacy audit in one training run (Steinke, Nasr & Jagielski, "Privacy auditing with
one (1) training run", NeurIPS 2023): a check on the accountant from outside it.

``m`` canaries (an image no hospital has, a question with a random case code and a random one-word
answer) are each put into a hospital's training data with probability ½. After training, each
canary is scored by what an attacker sees: how much more likely its answer became between the model
before and the model after (the hospital's update, or the global model of a federation). The
auditor guesses "in" for the ``k`` highest scores and "out" for the ``k`` lowest; the number of
right guesses, against what ε-DP allows (Binomial(r, e^ε / (1 + e^ε)), with the paper's δ term),
gives a lower bound on ε that holds with probability 1 - ``significance``. A bound above the
accountant's ε means the training did not have the privacy it claims (a dropped noise step, a
clipping mode that skips a layer, opacus#820); a bound below it says the audit found no
violation — it is a lower bound, never a proof of privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from medvlm.data.dataset import VQADataset, VQARows
from medvlm.features import with_frozen_features
from medvlm.model.vlm import MedVLM, sequence_loss

# one-word answers every tokenizer of the project knows (the public corpus uses them)
CANARY_WORDS = ("left", "right", "upper", "lower", "small", "large", "none", "one", "two", "three", "ct", "mri",
                "heart", "lung", "normal", "yes", "no")
CANARY_QUESTION = "what is the code word of case {code}?"    # code: two words, the canary's own key


@dataclass
class Canaries:
    images: np.ndarray          # (m, H, W) uint8: out-of-distribution (noise) images no hospital holds
    rows: list[dict]            # question / answer / answer_type / qtype / image_index, one per canary
    included: np.ndarray        # (m,) bool: put into the hospital's training data


def canary_words(tokenizer, limit: int = 400) -> list[str]:
    """Words the tokenizer keeps whole (one token each): what a canary's random answer is made of."""
    words = sorted({w.strip().lower() for w in tokenizer.get_vocab() if w.strip().isalpha() and len(w.strip()) >= 3})
    words = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:limit]
    return words if len(words) >= 20 else list(CANARY_WORDS)


def make_canaries(m: int, *, size: int, seed: int, words: Sequence[str] = CANARY_WORDS) -> Canaries:
    """``m`` canaries, each included with probability ½ (the audit's randomness, from ``seed``): a
    noise image, a question keyed by its own pair of words (whole tokens: easy for an attention layer
    to key on), and a random one-word answer: what only a member's training can teach."""
    if m < 20:
        raise ValueError(f"an audit needs at least 20 canaries (got {m}): with fewer, no guess can be significant")
    words = list(dict.fromkeys(words))
    if len(words) ** 2 < m:
        raise ValueError(f"{len(words)} canary words make only {len(words) ** 2} distinct keys for {m} canaries")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(m, size, size), dtype=np.uint8)
    keys = rng.choice(len(words) ** 2, size=m, replace=False)
    rows = [{"image_index": i, "question": CANARY_QUESTION.format(code=f"{words[k // len(words)]} {words[k % len(words)]}"),
             "answer": str(rng.choice(words)), "answer_type": "open", "qtype": "canary"} for i, k in enumerate(keys)]
    return Canaries(images, rows, rng.random(m) < 0.5)


@torch.no_grad()
def answer_losses(model: MedVLM, data: VQARows, *, batch_size: int = 256) -> np.ndarray:
    """Each row's loss on its own answer (the masked mean over the answer tokens)."""
    model.eval()
    dataset = VQADataset(with_frozen_features(model, data), model.tokenizer, model.cfg.max_text_len)
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        pixels, ids, mask, labels = (torch.stack(x).to(model.device) for x in zip(*batch))
        logits, targets = model(pixels, ids, mask, labels)
        out.append(sequence_loss(logits, targets).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def gradient_scores(before: MedVLM, update: dict[str, torch.Tensor], data: VQARows) -> np.ndarray:
    """A white-box attacker with the hospital's update ``update`` (after - before): each canary's
    loss gradient at ``before``, less the canaries' mean gradient (what they share: the question
    template, the answer words), scored by its alignment with the update. DP-SGD adds each member's
    clipped gradient to the update, so members align; the noise is there to hide exactly that."""
    params = before.trainable_parameters()
    names = [n for n in params if n in update]
    before.freeze_base()
    before.eval()
    dataset = VQADataset(with_frozen_features(before, data), before.tokenizer, before.cfg.max_text_len)
    grads = []
    for i in range(len(dataset)):
        pixels, ids, mask, labels = (x.unsqueeze(0).to(before.device) for x in dataset[i])
        logits, targets = before(pixels, ids, mask, labels)
        g = torch.autograd.grad(-sequence_loss(logits, targets).sum(), [params[n] for n in names], allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(params[n])).flatten().float().cpu()
                                for x, n in zip(g, names)]))
    g = torch.stack(grads)                                    # (m, d)
    g = g - g.mean(0, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    delta = torch.cat([update[n].flatten().float().cpu() for n in names])
    return (g @ delta).numpy()


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability, under (ε, δ)-DP, of ``v`` or more right guesses out of ``r`` among ``m`` canaries
    (the paper's Theorem: a Binomial(r, e^ε / (1 + e^ε)) tail plus its δ term)."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1, r, q) - beta) / i, initial=0.0))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_from_guesses(m: int, r: int, v: int, *, delta: float, significance: float) -> float:
    """The largest ε that ``v`` right guesses out of ``r`` reject at ``significance`` (0 when none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= significance and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= significance else (lo, mid)
    return lo


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, *, delta: float, significance: float = 0.05,
                        guesses: Sequence[int] = (10, 20, 50, 100, 200)) -> dict:
    """Guess "in" for the ``k`` highest scores and "out" for the ``k`` lowest, for each ``k`` (the
    significance split among them: Bonferroni); the best bound and how it was reached."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    ks = [k for k in guesses if 2 * k <= m] or [m // 2]
    order = np.argsort(-scores, kind="stable")
    best = {"epsilon": 0.0, "guesses": 0, "correct": 0, "k": None}
    for k in ks:
        top, bottom = order[:k], order[m - k:]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_from_guesses(m, 2 * k, v, delta=delta, significance=significance / len(ks))
        if eps > best["epsilon"] or best["k"] is None:
            best = {"epsilon": eps, "guesses": 2 * k, "correct": v, "k": k}
    return {**best, "canaries": m, "included": int(included.sum()), "significance": significance,
            "tried_k": ks}
