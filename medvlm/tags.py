"""Stage 1 at the hospitals: the fusion learns what each image's answers say, through a tag head.

The seed paper aligns its query transformer to the image before the language model learns to
answer. The public start does that on the public corpus (``recipes.foundation.align_fusion``),
so the fusion carries the public findings only; what only the hospitals hold (a pneumothorax, a
pacemaker) is in the frozen patch tokens (a linear probe reads it at 97-99%) but lost in the
fusion's output (86-87%) and DP-SGD through the frozen language model does not bring it back
(docs/benchmarks.md, December 3). A ``tags`` curriculum stage trains the fusion on each image's
own answers instead: every question row ``qtype=answer`` becomes a tag of its image, predicted by
a linear :class:`TagHead` on the mean of the fusion's output tokens (what the language model
reads). Two losses (a stage's ``tag_loss``):

* ``bce``: every answer a sigmoid of its own column, the mean over all columns (multi-label);
* ``yes-no``: each yes/no answer a two-way choice between its two columns (``kind=yes`` against
  ``kind=no``); other answers are not used. Under DP each image's clipped gradient then goes to the
  contrast that matters instead of to hundreds of columns the image does not name; on the
  consortium's hospital-only findings it is what teaches the fusion them at all (docs/benchmarks.md,
  "Where a new finding is learned").

Two choices keep this a hospital's own and its DP guarantee intact:

* the head **never leaves the hospital** (FedRep's split: the coordinator averages the fusion, each
  hospital keeps its head in its state directory); no label list has to be agreed. With a stage's
  ``tag_head: fixed`` (FedBABU's split) the head is not trained at all: every hospital builds the same
  random head from ``train.seed``, so each fusion learns towards one head instead of towards a head of
  its own that the average then no longer fits;
* tags are **hashed into a fixed number of columns**: the head's shape does not depend on which
  answers the data holds (a label list read from the data would make the model's shape itself a
  release of what the data contains).

The DP record of this stage is an *image* with all its tags (one row of the VQA stages is one
question): a guarantee per image covers each of its questions, so the stages compose on the
ledger as they are.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import TAG_LOSSES
from medvlm.data.dataset import VQARows
from medvlm.files import atomic_path

log = logging.getLogger(__name__)

TAG_COLUMNS = 512           # hashed tag columns of a hospital's head (a data-independent shape)
HEAD_FILE = "tag-head.safetensors"


def tag_of(row: dict) -> str:
    """An answer as a tag of its image: ``qtype=answer`` (the question itself when a data set has no
    question types), lower-cased, whitespace collapsed."""
    kind = str(row.get("qtype") or row.get("question", "")).strip().lower()
    answer = " ".join(str(row.get("answer", "")).lower().split())
    return f"{kind}={answer}"


def image_tags(data: VQARows) -> list[set[str]]:
    """One tag set per image of ``data`` (an image no row asks about has none)."""
    n = len(data.pixels) if data.pixels is not None else 0
    tags: list[set[str]] = [set() for _ in range(n)]
    for i, row in enumerate(data.rows):
        k = int(row["image_index"])
        if not 0 <= k < n:
            # the row by its index, not its question: at a deployed site this message reaches the coordinator
            raise ValueError(f"row {i} names image_index {k}, but the split has {n} images")
        tags[k].add(tag_of(row))
    return tags


def column(tag: str, columns: int = TAG_COLUMNS) -> int:
    """A tag's column: a stable hash (the same on every machine and in every process)."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "big") % columns


YES_NO = {"yes": "no", "no": "yes"}


def yes_no_columns(kind: str, columns: int = TAG_COLUMNS) -> dict[str, int]:
    """The two columns of a yes/no question kind under ``tag_loss: yes-no``: ``kind=yes``'s and
    ``kind=no``'s own columns, unless the two hash to the same one (1 kind in ``columns``; a data set
    whose kinds are its question texts has hundreds): then ``no`` moves to the first column a salted
    hash gives that differs, so the two-way choice never compares a column with itself (it would be a
    constant log 2 and learn nothing). Stable on every machine, like :func:`column`."""
    if columns < 2:
        raise ValueError(f"tag_loss yes-no needs at least 2 tag columns to tell yes from no, got {columns}")
    yes, no = column(f"{kind}=yes", columns), column(f"{kind}=no", columns)
    salt = 0
    while no == yes:
        salt += 1
        no = column(f"{kind}=no#{salt}", columns)
    return {"yes": yes, "no": no}


def tag_targets(tag_sets: Sequence[set[str]], columns: int = TAG_COLUMNS, loss: str = "bce") -> torch.Tensor:
    """Targets of ``tag_loss``. ``bce``: multi-hot (images, columns) of hashed tags. ``yes-no``: per image
    the (answer's column, other answer's column) of each of its yes/no tags (:func:`yes_no_columns`),
    (images, pairs, 2), padded with -1; a loss of ``yes-no`` over tags none of which is yes or no is an
    error."""
    _check_loss(loss)
    if loss == "bce":
        out = torch.zeros(len(tag_sets), columns)
        for i, tags in enumerate(tag_sets):
            out[i, [column(t, columns) for t in tags]] = 1.0
        return out
    pairs: list[list[tuple[int, int]]] = []
    unused: set[str] = set()
    for tags in tag_sets:
        mine = []
        for tag in sorted(tags):
            kind, _, answer = tag.rpartition("=")
            if answer in YES_NO:
                both = yes_no_columns(kind, columns)
                mine.append((both[answer], both[YES_NO[answer]]))
            else:
                unused.add(kind)
        pairs.append(mine)
    width = max((len(p) for p in pairs), default=0)
    if width == 0:
        raise ValueError(f"tag_loss yes-no reads yes/no answers, and none of the {len(tag_sets)} images has one "
                         f"(question types seen: {sorted(unused) or 'none'}): give the tags stage yes/no question "
                         "types (federation.stages.N.qtypes) or use tag_loss: bce")
    if unused:
        log.info("tag_loss yes-no: answers of %s are not yes or no and are not used in this stage", sorted(unused))
    out = torch.full((len(tag_sets), width, 2), -1, dtype=torch.long)
    for i, mine in enumerate(pairs):
        if mine:
            out[i, :len(mine)] = torch.tensor(mine)
    return out


def _check_loss(loss: str) -> None:
    if loss not in TAG_LOSSES:
        raise ValueError(f"tag loss {loss!r}: use one of {list(TAG_LOSSES)}")


class TagHead(nn.Module):
    """A linear head on the layer-normed *mean* of the fusion's output tokens: the mean is what the
    language model's attention reads without first learning a route to one token."""

    def __init__(self, width: int, columns: int = TAG_COLUMNS, loss: str = "bce", fixed: bool = False):
        super().__init__()
        _check_loss(loss)
        self.proj = nn.Linear(width, columns)
        self.loss = loss                     # what it is trained with (tag_targets / tag_loss); not a weight
        self.fixed = fixed                   # never trained: the fusion learns towards it (tag_head: fixed)
        self.proj.requires_grad_(not fixed)

    @property
    def columns(self) -> int:
        return self.proj.out_features

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(token_summary(visual_tokens))


def token_summary(visual_tokens: torch.Tensor) -> torch.Tensor:
    """What a tag head reads of the fusion's output tokens (B, T, D): their mean, layer-normed (B, D),
    scale-free since the fusion's output scale is fixed."""
    mean = visual_tokens.mean(1)
    return F.layer_norm(mean, mean.shape[1:])


class Tagger(nn.Module):
    """Fusion + tag head as one module (what Opacus wraps in a ``tags`` stage): patch tokens -> tag
    logits. It holds the model's own fusion, so training it trains the fusion that is sent."""

    def __init__(self, fusion: nn.Module, head: TagHead):
        super().__init__()
        self.fusion, self.head = fusion, head

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion(patch_tokens.float()))


@torch.no_grad()
def fusion_width(fusion: nn.Module, patch_tokens: torch.Tensor) -> int:
    """The width of the fusion's output tokens (a head's input), from one image's patch tokens."""
    device = next(fusion.parameters()).device
    return int(fusion(patch_tokens[:1].to(device).float()).shape[-1])


def tag_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """Per image (one DP record: nothing here mixes images). ``bce``: the mean binary cross-entropy over
    the tag columns. ``yes-no``: the sum over the image's yes/no tags of the two-way cross-entropy between
    the answer's column and the other answer's, ``softplus(other - answer)``."""
    _check_loss(loss)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    given = targets[..., 0] >= 0                                   # (images, pairs): padding is -1
    answer = logits.gather(1, targets[..., 0].clamp(min=0))
    other = logits.gather(1, targets[..., 1].clamp(min=0))
    return (F.softplus(other - answer) * given).sum(1)


def load_head(state_dir: str | Path, width: int, *, seed: int = 0, loss: str = "bce",
              fixed: bool = False) -> TagHead:
    """This hospital's tag head from its state directory, or a fresh one (seeded) on its first round;
    ``loss``: what the stage trains it with (the weights are the same shape either way). ``fixed``
    (``tag_head: fixed``): the seeded head itself, every round, never read from or written to disk."""
    from safetensors.torch import load_file

    path = Path(state_dir) / HEAD_FILE
    torch.manual_seed(seed)
    head = TagHead(width, loss=loss, fixed=fixed)
    if path.is_file() and not fixed:
        try:
            state = load_file(str(path))
            head.load_state_dict(state)
        except Exception as err:   # safetensors' own errors, wrong names or shapes
            raise ValueError(f"tag head {path} cannot be loaded ({err}); it is this hospital's own stage-1 head: "
                             "restore it, or delete it to start the head afresh (the fusion keeps what it learnt)"
                             ) from err
    return head


def save_head(head: TagHead, state_dir: str | Path) -> Path:
    """Write the head atomically into the hospital's state directory (never sent anywhere)."""
    from safetensors.torch import save_file

    path = Path(state_dir) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    return path
