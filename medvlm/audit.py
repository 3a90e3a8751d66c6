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
GUESSES = (10, 20, 50, 100, 200, 500)   # k tried: guess "in" for the k top scores, "out" for the k bottom


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


@dataclass
class GradientCanaries:
    """White-box canaries (Dirac gradients: Steinke, Nasr & Jagielski 2023, section 6; Nasr et al.
    2023): canary ``i`` is a training example whose gradient is ``sign[i] * norm`` on one coordinate
    (``index[i]``) of one trainable tensor (``names[i]``) and zero elsewhere. Included canaries are
    Poisson-sampled at the training's own sample rate and go through its own step: per-example
    clipping to the clip norm and the Gaussian noise under DP, straight into the gradient without.
    The attacker reads each canary's coordinate of the update: the noise hides a member's step there
    exactly as much as the accountant says; with the noise gone (or a tensor left without it,
    opacus#820) members stand out. An input-space canary (an image and question) on a model this small
    is barely memorised even without DP; a gradient canary measures the mechanism itself."""

    names: list[str]
    index: np.ndarray           # (m,) int: flat coordinate in its tensor
    sign: np.ndarray            # (m,) +1 / -1
    included: np.ndarray        # (m,) bool
    norm: float = 1.0           # each canary's gradient norm (at the clip norm: clipping keeps it whole)
    seed: int = 0               # the Poisson draws of the included canaries

    def __len__(self) -> int:
        return len(self.names)

    def scores(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], *,
               scaled: bool = True) -> np.ndarray:
        """How far each canary's coordinate moved against its gradient (descent moves it by -sign), in
        units of its tensor's typical move (the median absolute change: tensors move at different
        scales, and the attacker sees the whole update)."""
        moved = np.array([float(before[n].flatten()[i] - after[n].flatten()[i])
                          for n, i in zip(self.names, self.index)])
        if scaled:
            typical = {n: max(float((after[n].float() - before[n].float()).abs().median()), 1e-12)
                       for n in set(self.names)}
            moved = moved / np.array([typical[n] for n in self.names])
        return self.sign * moved

    def to_json(self) -> dict:
        return {"kind": "gradient-canaries", "names": self.names, "index": self.index.tolist(),
                "sign": self.sign.tolist(), "included": self.included.tolist(), "norm": self.norm, "seed": self.seed}

    @classmethod
    def from_json(cls, d: dict, *, source: str = "canaries") -> "GradientCanaries":
        if d.get("kind") != "gradient-canaries":
            raise ValueError(f"{source}: not a gradient-canary file (kind {d.get('kind')!r}); write one with "
                             "medvlm.audit.make_gradient_canaries(...).to_json()")
        m = len(d["names"])
        if not all(len(d[k]) == m for k in ("index", "sign", "included")):
            raise ValueError(f"{source}: names, index, sign and included must have one entry per canary")
        return cls(list(map(str, d["names"])), np.asarray(d["index"], dtype=np.int64),
                   np.asarray(d["sign"], dtype=np.float64), np.asarray(d["included"], dtype=bool),
                   float(d.get("norm", 1.0)), int(d.get("seed", 0)))

    def injector(self, params: dict[str, torch.nn.Parameter], *, sample_rate: float, batch_size: int,
                 dp: bool) -> "_Injector":
        unknown = sorted({n for n in self.names if n not in params})
        if unknown:
            raise ValueError(f"gradient canaries on tensors that do not train here: {', '.join(unknown[:5])}; "
                             "draw the canaries from the trainable tensors of this stage")
        for n, i in zip(self.names, self.index):
            if not 0 <= int(i) < params[n].numel():
                raise ValueError(f"gradient canary at {n}[{int(i)}]: the tensor has {params[n].numel()} entries")
        return _Injector(self, params, sample_rate, batch_size, dp)


class _Injector:
    """Adds the canaries drawn for the current logical step to its gradients, once per step."""

    def __init__(self, canaries: GradientCanaries, params: dict, sample_rate: float, batch_size: int, dp: bool):
        self.c, self.params, self.q, self.batch, self.dp = canaries, params, sample_rate, batch_size, dp
        self.members = np.flatnonzero(canaries.included)
        self.rng = np.random.default_rng(canaries.seed)
        self.pending = True
        self.drawn = 0          # canary draws over the training (a check: about q * steps * members)

    def add(self) -> None:
        """Into this physical batch, if the step has none yet: under DP as extra per-example gradient
        rows (Opacus clips and noises them with the rest); without DP into the mean gradient."""
        if not self.pending:
            return
        self.pending = False
        drawn = self.members[self.rng.random(len(self.members)) < self.q]
        self.drawn += len(drawn)
        if not len(drawn):
            return
        for name, p in self.params.items():
            rows = [(k, int(self.c.index[i]), self.c.sign[i] * self.c.norm) for k, i in enumerate(drawn)
                    if self.c.names[i] == name]
            if self.dp:
                extra = torch.zeros((len(drawn), p.numel()), dtype=p.dtype, device=p.device)
                for k, j, v in rows:
                    extra[k, j] = v
                gs = p.grad_sample
                if not isinstance(gs, torch.Tensor):
                    raise RuntimeError(f"{name}: no per-example gradients to add canaries to (grad_sample is "
                                       f"{type(gs).__name__}); gradient canaries need grad_sample_mode "
                                       "hooks, functorch or ew")
                p.grad_sample = torch.cat([gs, extra.view(len(drawn), *p.shape)])
            elif rows:
                flat = p.grad.view(-1)
                for _, j, v in rows:
                    flat[j] += v / self.batch

    def stepped(self) -> None:
        self.pending = True


def make_gradient_canaries(shapes: dict[str, Sequence[int]], m: int, *, seed: int, norm: float = 1.0
                           ) -> GradientCanaries:
    """``m`` canaries on distinct coordinates drawn uniformly over the tensors ``shapes`` (every
    trainable tensor in proportion to its size), random signs, each included with probability ½."""
    if m < 20:
        raise ValueError(f"an audit needs at least 20 canaries (got {m}): with fewer, no guess can be significant")
    names = list(shapes)
    sizes = np.array([int(np.prod(shapes[n])) for n in names])
    if sizes.sum() < m:
        raise ValueError(f"{m} gradient canaries need {m} distinct coordinates; the tensors have {sizes.sum()}")
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(int(sizes.sum()), size=m, replace=False))
    which = np.searchsorted(np.cumsum(sizes), flat, side="right")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return GradientCanaries([names[w] for w in which], (flat - starts[which]).astype(np.int64),
                            rng.choice([-1.0, 1.0], size=m), rng.random(m) < 0.5, float(norm), int(seed) + 1)


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


def bound_ceiling(m: int, *, delta: float, significance: float = 0.05,
                  guesses: Sequence[int] = GUESSES) -> float:
    """The largest bound ``m`` canaries can give at all (every guess right): the one-run audit's
    reach, so a bound is read against it, not against infinity."""
    ks = [k for k in guesses if 2 * k <= m] or [m // 2]
    return max(epsilon_from_guesses(m, 2 * k, 2 * k, delta=delta, significance=significance / len(ks)) for k in ks)


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, *, delta: float, significance: float = 0.05,
                        guesses: Sequence[int] = GUESSES) -> dict:
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
