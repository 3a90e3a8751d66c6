"""Tokenised image-text datasets with fixed-length text (DP-SGD wants fixed shapes per example).

Two tasks share one row form (``image_index, question, answer, answer_type, qtype``):

* ``vqa``: the prompt ``question: <q> answer:`` followed by `` <answer></s>``;
* ``report``: one row per image, ``answer_type="report"``, the prompt ``findings:`` followed by
  the findings report (the answer) and ``</s>``.

Every example is ``(pixels, input_ids, attention_mask, labels)``, right-padded to
``max_text_len``; labels are ``-100`` everywhere except the answer tokens. Images go through the
vision encoder's own ``preprocess`` once, when the dataset is built.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medvlm.config import TASKS, DataConfig, StageConfig
from medvlm.data.images import load_image
from medvlm.data.manifest import read_manifest, row_patient
from medvlm.data.synthetic import (HOSPITAL_ONLY_QTYPES, QTYPES, SyntheticSet, generate_hospital, resolve_profile,
                                   split_images)

IGNORE_INDEX = -100   # label of a prompt token: the loss covers the answer only (PyTorch's cross-entropy default)
REPORT_PROMPT = "findings:"
log = logging.getLogger(__name__)

REPORT_QUESTION = "write the findings report."   # what a report row's "question" says (logs, manifests)
MIN_PROMPT_TOKENS = 4                             # a long answer (a report) leaves this much for the prompt
SPLITS = ("train", "val", "test")
IID_STREAM = 1_000_003   # data.partition=iid's seed stream: disjoint from the generator's and the splits'


def prompt_text(question: str) -> str:
    return f"question: {question.strip().lower()} answer:"


def row_prompt(row: dict) -> str:
    """The prompt text of a row: the report prompt for report rows, the question otherwise."""
    return REPORT_PROMPT if row.get("answer_type") == "report" else prompt_text(row["question"])


def report_row(image_index: int, report: str, **extra) -> dict:
    """One report-generation row (the report is the answer)."""
    return {**extra, "image_index": image_index, "question": REPORT_QUESTION, "answer": report.strip(),
            "answer_type": "report", "qtype": "report"}


def _fit(tokenizer, prompt: list[int], answer: list[int] | None, max_len: int) -> tuple[list[int], list[int]]:
    if answer is None:
        return prompt[-max_len:], [IGNORE_INDEX] * min(len(prompt), max_len)
    target = answer[: max_len - MIN_PROMPT_TOKENS - 1] + [tokenizer.eos_token_id]
    prompt = prompt[-(max_len - len(target)):]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def _tokens(tokenizer, prompt: str, answer: str | None) -> tuple[list[int], list[int] | None]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return ids, None
    return ids, tokenizer(" " + answer.strip().lower(), add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: str, answer: str | None, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (a :func:`row_prompt`) + answer + eos, and the labels; truncates the
    prompt from the left and the answer's end, never the eos."""
    return _fit(tokenizer, *_tokens(tokenizer, prompt, answer), max_len)


_CUTS_SAID: set[tuple] = set()


def encode_rows(tokenizer, rows: Sequence[dict], max_len: int, *,
                answers: bool = True) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` of every row (with its answer, or the prompt alone), and a warning (once
    per kind of cut) when some did not fit ``max_len`` tokens: a question that loses its start, or an
    answer (a report) that loses its end, is trained or asked on what is left of it."""
    out, lost_start, lost_end = [], [], []
    for r in rows:
        prompt, answer = _tokens(tokenizer, row_prompt(r), r["answer"] if answers else None)
        ids, labels = _fit(tokenizer, prompt, answer, max_len)
        kept = sum(1 for label in labels if label == IGNORE_INDEX)
        if kept < len(prompt):
            lost_start.append(r)
        if answer is not None and len(ids) - kept - 1 < len(answer):
            lost_end.append(r)
        out.append((ids, labels))
    for cut, what in ((lost_start, "lose their start (the question's first words)"),
                      (lost_end, "lose their end (the answer's last words)")):
        if cut and (key := (what, max_len, len(cut), len(rows))) not in _CUTS_SAID:
            _CUTS_SAID.add(key)
            example = cut[0].get("question") if what.startswith("lose their start") else cut[0].get("answer")
            log.warning("%d of %d rows are longer than model.max_text_len=%d tokens and %s, e.g. %r: the model "
                        "sees what is left; set model.max_text_len higher to keep them whole",
                        len(cut), len(rows), max_len, what, str(example)[:120])
    return out


@dataclass
class VQARows:
    """Questions about a shared pool of images: preprocessed pixels, or (``tokens``) the frozen
    vision tower's patch tokens of them, encoded once (``medvlm.features.with_frozen_features``)."""

    pixels: Optional[torch.Tensor]   # (N_images, 3, H, W); tokens: (N_images, P, D); None: rows only
    rows: list[dict]                 # each with image_index, question, answer, answer_type, qtype
    tokens: bool = False             # pixels holds patch tokens, not pixels

    def __post_init__(self) -> None:
        want = 3 if self.tokens else 4
        if self.pixels is not None and self.pixels.numel() and self.pixels.dim() != want:
            raise ValueError(f"VQARows: {'patch tokens' if self.tokens else 'pixels'} must be a {want}-D tensor "
                             f"({'images, patches, width' if self.tokens else 'images, channels, height, width'}), "
                             f"got shape {tuple(self.pixels.shape)}")

    def as_tokens(self, tokens: torch.Tensor) -> "VQARows":
        """The same rows over the images' patch tokens."""
        return VQARows(tokens, self.rows, tokens=True)

    def select(self, rows: list[dict]) -> "VQARows":
        """Other rows over the same images."""
        return VQARows(self.pixels, rows, self.tokens)

    def __len__(self) -> int:
        return len(self.rows)


class VQADataset(Dataset):
    def __init__(self, data: VQARows, tokenizer, max_len: int):
        self.data, self.tokenizer, self.max_len = data, tokenizer, max_len
        n = len(data.rows)
        self.input_ids = torch.full((n, max_len), tokenizer.pad_token_id, dtype=torch.long)
        self.attention_mask = torch.zeros((n, max_len), dtype=torch.long)
        self.labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.long)
        self.image_index = torch.tensor([r["image_index"] for r in data.rows], dtype=torch.long)
        for i, (ids, labels) in enumerate(encode_rows(tokenizer, data.rows, max_len)):
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.attention_mask[i, : len(ids)] = 1
            self.labels[i, : len(labels)] = torch.tensor(labels)

    @property
    def rows(self) -> list[dict]:
        return self.data.rows

    def __len__(self) -> int:
        return len(self.data.rows)

    def __getitem__(self, i: int):
        return self.data.pixels[self.image_index[i]], self.input_ids[i], self.attention_mask[i], self.labels[i]


def preprocess_images(images: Sequence, preprocess: Callable) -> torch.Tensor:
    """uint8 arrays or PIL images -> the encoder's normalised tensors (one shared path)."""
    out = [preprocess(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))) for im in images]
    return torch.stack(out) if out else torch.empty(0)


def task_rows(rows: Sequence[dict], task: str = "vqa", qtypes: Sequence[str] = ()) -> list[dict]:
    """The rows one task trains on, from rows that may mix questions and reports (keyed by ``image``
    or ``image_index``): ``vqa`` keeps the question rows (only ``qtypes`` when given); ``report``
    makes one report row per image from report rows, or from the ``report`` a question row carries."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {list(TASKS)}")
    if task == "vqa":
        out = [dict(r) for r in rows if "question" in r and r.get("answer_type") != "report"]
        return [r for r in out if r.get("qtype", "all") in qtypes] if qtypes else out
    reports: dict = {}
    for r in rows:
        key = r.get("image", r.get("image_index"))
        text = r.get("report") if r.get("answer_type") != "report" else r["answer"]
        if key not in reports and isinstance(text, str) and text.strip():
            keep = {k: v for k, v in r.items() if k in ("image", "modality", "split", "where", "patient")}
            reports[key] = report_row(r.get("image_index", -1), text, **keep)
    return list(reports.values())


def from_synthetic(ds: SyntheticSet, preprocess: Callable, *, task: str = "vqa", qtypes: Sequence[str] = ()) -> VQARows:
    return VQARows(preprocess_images(ds.images, preprocess), task_rows(ds.rows, task, qtypes))


class EncodeFiles(Protocol):
    """Frozen patch tokens for image files (a :class:`medvlm.features.FeatureCache`)."""

    def __call__(self, paths: Sequence[str], load: Callable[[str], torch.Tensor]) -> torch.Tensor: ...

    def cached(self, path: str) -> bool:
        """True when this exact file was decoded and encoded before (its check can be skipped)."""
        ...


def from_manifest(path: str, preprocess: Callable, *, cfg: Optional[DataConfig] = None,
                  encode_files: Optional[EncodeFiles] = None, images: bool = True) -> VQARows:
    """The VQA rows of a data folder/file in any supported format (checked row by row). Images
    are decoded with ``load_image`` and the encoder's ``preprocess``; with ``encode_files``
    (a :class:`medvlm.features.FeatureCache`'s) they come back as frozen patch tokens instead,
    cached ones without being decoded at all (not even by the check). ``images=False``: the rows
    alone (pixels None), each row's ``image_index`` naming its image for :func:`with_images`."""
    cfg = cfg or DataConfig(source=str(path))
    manifest = read_manifest(path, fmt=cfg.format, on_bad_row=cfg.on_bad_row, dicom=cfg.dicom, language=cfg.language,
                             known_good=encode_files.cached if encode_files else None)
    log.info("%s: %s; %d rows%s", path, manifest.layout, len(manifest.rows),
             "".join(f"; left out {n}: {reason}" for reason, n in manifest.left_out.items()))
    vqa = task_rows(manifest.rows, cfg.task, cfg.qtypes)
    if cfg.task == "vqa" and (missing := [q for q in cfg.qtypes if not any(r.get("qtype") == q for r in vqa)]):
        here = sorted({str(r.get("qtype")) for r in manifest.rows if r.get("qtype") is not None})
        log.warning("%s: no question of type %s here (the types here: %s); the others are used", path,
                    ", ".join(map(repr, missing)), ", ".join(here[:20]) or "none: the rows name no qtype")
    if not vqa and cfg.task == "vqa":
        raise ValueError(f"{path}: {len(manifest.report_rows)} report row(s) and no question/answer rows"
                         f"{' of qtype ' + str(list(cfg.qtypes)) if cfg.qtypes else ''}; the VQA task needs rows "
                         "with question, answer and answer_type (or set data.task=report)")
    if not vqa:
        raise ValueError(f"{path}: no image has a report; the report task needs report rows (image, report) or "
                         "question rows that carry a 'report' field (or set data.task=vqa)")
    index = {p: i for i, p in enumerate(dict.fromkeys(r["image"] for r in vqa))}
    rows = VQARows(None, [dict(r, image_index=index[r["image"]], qtype=r.get("qtype") or "all") for r in vqa])
    return with_images(rows, preprocess, cfg.dicom, encode_files) if images else rows


def with_images(data: VQARows, preprocess: Callable, dicom=None, encode_files: Optional[EncodeFiles] = None
                ) -> VQARows:
    """Rows read without their images (``from_manifest(images=False)``, then split) over their images: image
    ``i`` is the file the rows with ``image_index`` i name. A site splits its rows first and reads each split's
    images into its own tensor: reading all of them and then copying them into the splits held every image
    twice."""
    paths: list[str] = [""] * _image_count(data)
    for r in data.rows:
        paths[r["image_index"]] = r["image"]

    def load(p: str) -> torch.Tensor:
        return preprocess(load_image(p, dicom))

    pixels = encode_files(paths, load) if encode_files else _decoded(paths, load)
    return VQARows(pixels, data.rows, tokens=encode_files is not None)   # a feature cache hands back patch tokens


def _image_count(data: VQARows) -> int:
    if data.pixels is not None:
        return len(data.pixels)
    return 1 + max((r["image_index"] for r in data.rows), default=-1)


def _decoded(paths: list[str], load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Every image decoded into one tensor, filled in place (the memory it needs checked first)."""
    if not paths:
        return torch.empty(0)
    first = load(paths[0])
    out = reserve((len(paths), *first.shape), "the images' pixels")
    out[0] = first
    for i, path in enumerate(paths[1:], start=1):
        out[i] = load(path)
    return out


def reserve(shape: tuple[int, ...], what: str) -> torch.Tensor:
    """An empty float32 tensor for a site's images, refused with the figures when it cannot fit in the memory
    this machine has free: allocation succeeds on Linux either way, and a site that outgrew its machine would
    otherwise be killed by the kernel part-way through reading, with nothing said."""
    import psutil

    need = 4 * math.prod(shape)
    free = psutil.virtual_memory().available
    if need > free:
        raise MemoryError(f"{what}: {shape[0]} image(s) × {' × '.join(map(str, shape[1:]))} float32 values need "
                          f"{need / 2**30:.1f} GiB, and this machine has {free / 2**30:.1f} GiB free: give this "
                          "site fewer images (a data folder holding a part of them, or data.qtypes), or run it on "
                          "a machine with more memory")
    return torch.empty(shape)


def split_rows(data: VQARows, *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, VQARows]:
    """Split by image, so no image's questions straddle train and test; by patient where the rows
    name one (``patient``), so no patient's images do either (two views of one study, or a follow-up
    study, in train and test would score recall, not reading)."""
    parts = draw_split(data.rows, list(range(_image_count(data))), val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed)
    return {name: _subset(data, [r for r in data.rows if r["image_index"] in keep]) for name, keep in parts.items()}


def draw_split(rows: Sequence[dict], images: list[int], *, val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, set[int]]:
    """``images`` (indices) drawn into test / val / train, whole patients at a time where ``rows``
    name them (an image without a patient is its own); without any, exactly :func:`split_images`."""
    patient: dict[int, str] = {}
    for r in rows:
        if name := row_patient(r):
            patient.setdefault(r["image_index"], name)
    unit = (lambda i: patient.get(i, f"\0{i}")) if patient else (lambda i: i)
    units = sorted({unit(i) for i in images}) if patient else images
    parts = split_images(len(units), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    chosen = {units[u]: name for name, picked in parts.items() for u in picked}
    return {name: {i for i in images if chosen[unit(i)] == name} for name in parts}


def _subset(data: VQARows, rows: Sequence[dict]) -> VQARows:
    """The rows given, with only the images they use (re-indexed)."""
    keep = sorted({r["image_index"] for r in rows})
    remap = {old: new for new, old in enumerate(keep)}
    pixels = None if data.pixels is None else data.pixels[keep] if keep else data.pixels[:0]
    return VQARows(pixels, [dict(r, image_index=remap[r["image_index"]]) for r in rows], data.tokens)


PUBLISHED_SPLITS = {"train": "train", "val": "val", "validate": "val", "valid": "val", "test": "test"}


def published_splits(data: VQARows, *, val_fraction: float, seed: int) -> Optional[dict[str, VQARows]]:
    """The release's own train / val / test (its ``split`` per row), or None when its rows carry none.
    A release that publishes no validation split (VQA-RAD, PMC-VQA) gets one drawn from its training
    images (``val_fraction`` of them): the test split stays exactly as published."""
    named = [PUBLISHED_SPLITS.get(str(r.get("split", "")).lower()) for r in data.rows]
    if not data.rows or any(n is None for n in named):
        return None
    groups: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r, n in zip(data.rows, named):
        groups[n].append(r)
    if not groups["val"] and groups["train"]:
        images = sorted({r["image_index"] for r in groups["train"]})
        val = draw_split(groups["train"], images, val_fraction=val_fraction, test_fraction=0.0, seed=seed)["val"]
        groups["val"] = [r for r in groups["train"] if r["image_index"] in val]
        groups["train"] = [r for r in groups["train"] if r["image_index"] not in val]
    return {name: _subset(data, rows) for name, rows in groups.items()}


def check_synthetic(data: DataConfig, stages: Sequence[StageConfig] = ()) -> None:
    """What a run on the synthetic hospitals needs of ``data.hospitals`` and the question types it (and each
    of ``stages``) names, checked before anything starts (these settings mean nothing to a deployed site,
    which reads its own data): a name twice (two sites on one ledger), an unknown profile or question type
    (a typo trained on nothing), a hospital-only type without ``data.hospital_only``."""
    names = data.hospitals
    if not names:
        raise ValueError("config: data.hospitals is empty: name at least one hospital profile (a simulation runs "
                         "one SuperNode per name)")
    if twice := sorted({h for h in names if names.count(h) > 1}):
        raise ValueError(f"config: data.hospitals={names}: {', '.join(twice)} named twice (two sites would share "
                         f"one privacy ledger): a second site like one is <profile>-<k>, e.g. {twice[0]}-1")
    for name in names:
        try:
            resolve_profile(name)
        except ValueError as err:
            raise ValueError(f"config: data.hospitals: {err}") from None
    asked = [("data.qtypes", data.qtypes)] + [(f"federation.stages[{s.name}].qtypes", s.qtypes) for s in stages]
    for key, qtypes in asked:
        if unknown := [q for q in qtypes if q not in QTYPES]:
            raise ValueError(f"config: {key}={list(qtypes)}: the synthetic hospitals ask no "
                             f"{', '.join(map(repr, unknown))} question (nothing is trained or scored on it): use "
                             f"some of {list(QTYPES)}")
        if hidden := [q for q in qtypes if q in HOSPITAL_ONLY_QTYPES and not data.hospital_only]:
            raise ValueError(f"config: {key}={list(qtypes)}: {', '.join(hidden)} questions are asked only with "
                             "data.hospital_only=true (the findings the public corpus lacks)")


def load_splits(cfg: DataConfig, preprocess: Callable, *, hospitals: Sequence[str] | None = None,
                encode_files: Optional[EncodeFiles] = None, only: Sequence[str] = SPLITS) -> dict[str, VQARows]:
    """train/val/test VQARows for the configured data (synthetic hospitals pooled, or a data
    folder in any supported format; ``encode_files``: see :func:`from_manifest`). A folder's images are
    read for the splits in ``only`` (a site trains on train and scores val: its test images stay unread)."""
    if cfg.source != "synthetic":   # split the rows, then read each split's images (each image held once)
        data = from_manifest(cfg.source, preprocess, cfg=cfg, encode_files=encode_files, images=False)
        parts = published_splits(data, val_fraction=cfg.val_fraction, seed=cfg.seed) \
            if cfg.split_source == "dataset" else None
        if parts is not None:
            log.info("%s: the release's own splits: %s", cfg.source,
                     ", ".join(f"{k} {len(v)} rows" for k, v in parts.items()))
        else:
            parts = split_rows(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
        return {name: with_images(part, preprocess, cfg.dicom, encode_files) for name, part in parts.items()
                if name in only}
    check_synthetic(cfg)
    names = list(hospitals or cfg.hospitals)
    held = _iid_partition(cfg, preprocess, names) if cfg.partition == "iid" else {
        name: _own_splits(cfg, name, preprocess) for name in names}
    return {split: concat([held[name][split] for name in names]) for split in SPLITS}


def _own_splits(cfg: DataConfig, name: str, preprocess: Callable) -> dict[str, VQARows]:
    """One synthetic hospital's own images (its profile's), split by image."""
    hospital = generate_hospital(name, cfg.images_per_hospital, seed=cfg.seed, hospital_only=cfg.hospital_only)
    data = from_synthetic(hospital, preprocess, task=cfg.task, qtypes=cfg.qtypes)
    return split_rows(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)


def _iid_partition(cfg: DataConfig, preprocess: Callable, names: Sequence[str]) -> dict[str, dict[str, VQARows]]:
    """``data.partition=iid``: the consortium's images (every hospital in ``data.hospitals``, each split as
    its own hospital splits them) pooled per split and dealt out at random, each hospital getting as many
    images of each split as it holds of its own. The pooled train / val / test sets are the same images as
    with ``own``; only who holds which changes, so a federation on both isolates what the non-IID split costs."""
    unknown = [n for n in names if n not in cfg.hospitals]
    if unknown:
        raise ValueError(f"data.partition=iid deals out the images of data.hospitals {list(cfg.hospitals)}: "
                         f"{unknown} is not one of them; add it there or use data.partition=own")
    own = {name: _own_splits(cfg, name, preprocess) for name in cfg.hospitals}
    dealt: dict[str, dict[str, VQARows]] = {name: {} for name in cfg.hospitals}
    for k, split in enumerate(SPLITS):
        pooled = concat([own[name][split] for name in cfg.hospitals])
        order = np.random.default_rng([cfg.seed, IID_STREAM, k]).permutation(len(pooled.pixels)).tolist()
        start = 0
        for name in cfg.hospitals:
            end = start + len(own[name][split].pixels)
            share, start = set(order[start:end]), end
            dealt[name][split] = _subset(pooled, [r for r in pooled.rows if r["image_index"] in share])
    return dealt


def concat(parts: Sequence[VQARows]) -> VQARows:
    rows, offset = [], 0
    for p in parts:
        rows += [dict(r, image_index=r["image_index"] + offset) for r in p.rows]
        offset += len(p.pixels)
    if len({p.tokens for p in parts}) > 1:
        raise ValueError("cannot join rows over pixels with rows over patch tokens: encode them all first")
    return VQARows(torch.cat([p.pixels for p in parts]), rows, parts[0].tokens if parts else False)
