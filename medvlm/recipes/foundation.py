"""The built-in tiny "foundation": a tiny ViT and a tiny LM pretrained on a synthetic *public*
corpus, the miniature of freezing BiomedCLIP (pretrained on PMC-15M) and a radiology LLM.

Random frozen encoders are a poor base (the fusion + LoRA must then do all the work), so the
project pretrains its own, deterministically, from a seed stream that no hospital uses:
  * tokenizer: byte-level BPE trained with ``tokenizers`` on the corpus text;
  * vision: open_clip CLIP (tiny ViT + tiny text tower), contrastive image-report training;
  * language: a Llama-shaped causal LM trained on reports and question/answer lines.
The result is written as ordinary model directories (``vision/`` laid out like BiomedCLIP's
open_clip directory, ``lm/`` as ``save_pretrained`` writes it) and loaded through the same code
path a hospital uses for real models. ``medvlm-fl build-foundation`` (re)builds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvlm.data.synthetic import generate_hospital, public_corpus_text, report_text
from medvlm.files import atomic_path, cache_root
from medvlm.loop import fit, sampled_indices
from medvlm.quiet import no_progress_bars, without_log
from medvlm.tags import TagHead

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "model" / "builtin"   # the tiny architectures
FOUNDATION_VERSION = 2          # bump when the recipe below changes: it invalidates caches
VARIANTS = ("tiny", "tiny-random")
PUBLIC_SEED = 20240416          # the public corpus' seed; hospitals use other seed streams
PUBLIC_IMAGES = 3000
CLIP_STEPS, CLIP_BATCH, CLIP_LR = 300, 96, 2e-3
LM_STEPS, LM_BATCH, LM_LR, LM_MAX_LEN = 400, 64, 3e-3, 32


def foundation_key(variant: str) -> str:
    recipe = {"version": FOUNDATION_VERSION, "variant": variant, "public_seed": PUBLIC_SEED,
              "images": PUBLIC_IMAGES, "clip": [CLIP_STEPS, CLIP_BATCH, CLIP_LR], "lm": [LM_STEPS, LM_BATCH, LM_LR],
              "vit": (BUILTIN_DIR / "tiny_vit.json").read_text(), "lm_cfg": (BUILTIN_DIR / "tiny_lm.json").read_text()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def foundation_dir(variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown built-in model {variant!r}: use one of builtin:{', builtin:'.join(VARIANTS)}")
    return cache_root() / f"foundation-{variant}-{foundation_key(variant)}"


def ensure_foundation(variant: str) -> Path:
    """Return the built-in model directory, building it on first use (cached afterwards)."""
    path = foundation_dir(variant)
    if not (path / "build.json").is_file():
        build_foundation(variant)
    return path


def builtin_source(source: str, part: str) -> str:
    """A ``builtin:<variant>`` source as what the model loads: the foundation's ``vision`` directory
    as an open_clip ``local-dir:`` name, or its ``lm`` directory (built on first use)."""
    directory = ensure_foundation(source.split(":", 1)[1]) / part
    return f"local-dir:{directory}" if part == "vision" else str(directory)


def builtin_sources(cfg):
    """``cfg`` (a ModelConfig) with each ``builtin:`` source replaced by its local directory."""
    from dataclasses import replace

    vision, language = cfg.vision, cfg.language
    if vision.source.startswith("builtin:"):
        vision = replace(vision, source=builtin_source(vision.source, "vision"))
    if language.source.startswith("builtin:"):
        language = replace(language, source=builtin_source(language.source, "lm"))
    return replace(cfg, vision=vision, language=language)


# ----------------------------------------------------------------------------- pieces
def train_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _pretrain_clip(clip, images: np.ndarray, captions: list[str], tokenizer, preprocess, progress: bool) -> float:
    from open_clip import ClipLoss
    from PIL import Image

    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    text = tokenizer(captions)
    loss_fn = ClipLoss()

    def step_loss(idx: torch.Tensor) -> float:
        image_features, text_features, logit_scale = clip(pixels[idx], text[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        return loss.item()

    opt = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=CLIP_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=CLIP_LR, total_steps=CLIP_STEPS, pct_start=0.1)
    batches = sampled_indices(len(pixels), CLIP_BATCH, torch.Generator().manual_seed(PUBLIC_SEED))
    clip.train()
    fitted = fit(batches, step_loss, opt, sched, CLIP_STEPS, desc="foundation: contrastive ViT", progress=progress)
    clip.eval()
    return float(np.mean(fitted.losses[-50:]))


def _pretrain_lm(lm, tokenizer, lines: list[str], progress: bool) -> float:
    enc = tokenizer([line + tokenizer.eos_token for line in lines], padding="max_length", truncation=True,
                    max_length=LM_MAX_LEN, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def step_loss(idx: torch.Tensor) -> float:
        logits = lm(input_ids=ids[idx], attention_mask=mask[idx]).logits[:, :-1]
        target = ids[idx][:, 1:].masked_fill(mask[idx][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        loss.backward()
        return loss.item()

    opt = torch.optim.AdamW(lm.parameters(), lr=LM_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LM_LR, total_steps=LM_STEPS, pct_start=0.1)
    batches = sampled_indices(len(ids), LM_BATCH, torch.Generator().manual_seed(PUBLIC_SEED + 1))
    lm.train()
    fitted = fit(batches, step_loss, opt, sched, LM_STEPS, desc="foundation: language model", progress=progress)
    lm.eval()
    return float(np.mean(fitted.losses[-50:]))


def build_foundation(variant: str = "tiny", *, progress: bool = True) -> Path:
    """Build (or rebuild) a built-in model directory; written atomically into the cache."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    target = foundation_dir(variant)
    pretrain = variant == "tiny"
    started = time.perf_counter()
    with atomic_path(target) as work:   # a crash mid-build leaves no half-built foundation behind
        shutil.rmtree(work, ignore_errors=True)   # what a killed build of a process with our pid left
        work.mkdir()
        corpus = generate_hospital("public", PUBLIC_IMAGES if pretrain else 200, seed=PUBLIC_SEED)
        lines = public_corpus_text(corpus.findings)
        lm_cfg = json.loads((BUILTIN_DIR / "tiny_lm.json").read_text())
        tokenizer = train_tokenizer(lines, lm_cfg["vocab_size"])

        # --- vision: an open_clip directory like BiomedCLIP's
        (work / "vision").mkdir()
        shutil.copy(BUILTIN_DIR / "tiny_vit.json", work / "vision" / "open_clip_config.json")
        torch.manual_seed(PUBLIC_SEED)
        with without_log("", "Local config loaded, but no CLIP weights", "No pretrained weights loaded"):
            # open_clip notes that it starts from random weights: here that is the point
            clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(work / "vision"))
        clip_loss = None
        if pretrain:
            captions = [report_text(f) for f in corpus.findings]
            clip_tok = open_clip.get_tokenizer("local-dir:" + str(work / "vision"))
            clip_loss = _pretrain_clip(clip, corpus.images, captions, clip_tok, preprocess, progress)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
                  str(work / "vision" / "open_clip_model.safetensors"))

        # --- language: a save_pretrained directory like any Hugging Face causal LM
        torch.manual_seed(PUBLIC_SEED + 1)
        config = AutoConfig.for_model(**{**lm_cfg, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
        lm = AutoModelForCausalLM.from_config(config)
        lm_loss = _pretrain_lm(lm, tokenizer, lines, progress) if pretrain else None
        with no_progress_bars():   # transformers' "Writing model shards" bar for a one-shard tiny model
            lm.save_pretrained(work / "lm")
        tokenizer.save_pretrained(work / "lm")

        info = {"variant": variant, "key": foundation_key(variant), "seconds": round(time.perf_counter() - started, 1),
                "public_images": len(corpus.images), "clip_final_loss": clip_loss, "lm_final_loss": lm_loss,
                "torch": torch.__version__}
        (work / "build.json").write_text(json.dumps(info, indent=2))
    log.info("built %s foundation in %.1fs -> %s", variant, time.perf_counter() - started, target)
    return target


# ----------------------------------------------------------------------------- stages 1-2 on public data
PUBLIC_TUNE_IMAGES, PUBLIC_TUNE_EPOCHS, PUBLIC_TUNE_BATCH, PUBLIC_TUNE_LR = 1200, 3, 64, 2e-3
# stage 1 (alignment): the fusion alone learns to carry the findings of the public reports
PUBLIC_ALIGN_EPOCHS, PUBLIC_ALIGN_BATCH, PUBLIC_ALIGN_LR = 50, 64, 3e-3
PUBLIC_TUNE_SEED = PUBLIC_SEED + 7   # fresh public images, disjoint from the pretraining draw
# Public images as different scanners store them (gamma, noise, inverted share): hospitals differ
# in exactly these ways, so a start that has seen them transfers (domain randomisation).
PUBLIC_TUNE_SCANNERS = ((1.0, 0.05, 0.15), (0.75, 0.04, 0.0), (1.3, 0.03, 0.5), (0.9, 0.08, 0.1))


def public_state_path(cfg) -> Path:
    """Fusion + LoRA trained on the public corpus for this architecture (built on first use).

    The seed paper's stages 1-2 in miniature, on *public* images only: stage 1 aligns the fusion
    to the findings of the public reports (:func:`align_fusion`), stage 2 tunes fusion + LoRA to
    answer questions about the images (non-private: no hospital is involved). A hospital federation then
    starts from a model that already speaks, and spends its privacy budget on what is specific
    to its patients. No hospital is involved, so no privacy is spent here.
    """
    if cfg.vision.source != "builtin:tiny" or cfg.language.source != "builtin:tiny":
        raise ValueError("model.init=public trains on the built-in public corpus and needs "
                         "model.vision.source=builtin:tiny and model.language.source=builtin:tiny; for other "
                         "models use model.init=random or an exported adapter folder")
    recipe = {"fusion": {k: v for k, v in vars(cfg.fusion).items() if k != "init"}, "lora": {k: v for k, v in vars(cfg.lora).items() if k != "ffa"},
              "max_text_len": cfg.max_text_len, "parametrisation": 5,   # 4: no stale stage-1 gradient; 5: stage 1 on the mean
              "tune": [PUBLIC_TUNE_IMAGES, PUBLIC_TUNE_EPOCHS, PUBLIC_TUNE_BATCH, PUBLIC_TUNE_LR, PUBLIC_TUNE_SEED],
              "align": [PUBLIC_ALIGN_EPOCHS, PUBLIC_ALIGN_BATCH, PUBLIC_ALIGN_LR],
              "scanners": PUBLIC_TUNE_SCANNERS}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:12]
    path = ensure_foundation("tiny") / "public-tuned" / f"state-{key}.safetensors"
    if not path.is_file():
        build_public_state(cfg, path)
    return path


def align_fusion(model, features: torch.Tensor, label_sets: list[set[str]], *, epochs: int = PUBLIC_ALIGN_EPOCHS,
                 batch_size: int = PUBLIC_ALIGN_BATCH, lr: float = PUBLIC_ALIGN_LR, seed: int = PUBLIC_TUNE_SEED,
                 progress: bool = True) -> dict:
    """Stage 1: train the fusion alone so that its visual tokens carry each image's findings.

    Targets (``label_sets``, one set per image) are the finding labels a report labeler extracts
    from the image's public report (presence, side, count: CheXpert-style labels from text) and
    the study's modality (a DICOM header field in real data), predicted by a throw-away linear
    head on the *mean* of the visual tokens. The mean is what the language model's attention reads
    without first learning a route to one token: with a head on all tokens together the sides were
    in the tokens (a linear probe reads them at 87-94%) yet every model answered "which side" at
    chance; through the mean, with LoRA on every linear layer of the LM, the default start answers
    which lung at 90% and which base at 68% (docs/benchmarks.md, December 3).
    Answering through the frozen LLM alone, the fusion learns this slowly: nodules (a few pixels)
    stay at chance after the whole stage-2 tuning without it. ``features``: frozen patch tokens
    (N, P, D). Returns the first and final losses and the label vocabulary."""
    vocab = sorted(set().union(*label_sets))
    column = {label: j for j, label in enumerate(vocab)}
    targets = torch.zeros(len(label_sets), len(vocab))
    for i, labels in enumerate(label_sets):
        targets[i, [column[label] for label in labels]] = 1.0
    fusion = model.fusion
    was = [p.requires_grad for p in fusion.parameters()]
    fusion.requires_grad_(True)
    with torch.no_grad():
        width = fusion(features[:1]).shape[-1]
    head = TagHead(width, len(vocab))   # the hospitals' stage 1 (medvlm.tags) reads the fusion the same way

    def step_loss(idx: torch.Tensor) -> float:
        logits = head(fusion(features[idx]))
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        loss.backward()
        return loss.item()

    steps = max(1, epochs * (len(features) // batch_size))
    opt = torch.optim.AdamW([*fusion.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = sampled_indices(len(features), batch_size, torch.Generator().manual_seed(seed))
    losses = fit(batches, step_loss, opt, sched, steps, desc="public stage 1: fusion on report findings",
                 progress=progress).losses
    for p, flag in zip(fusion.parameters(), was):
        p.requires_grad_(flag)
    return {"initial_loss": float(np.mean(losses[:5])), "loss": float(np.mean(losses[-5:])), "labels": vocab}


def build_public_state(cfg, path: Path, *, progress: bool = True) -> Path:
    from dataclasses import replace

    from safetensors.torch import save_file

    from medvlm.config import PrivacyConfig, TrainConfig
    from medvlm.data.dataset import VQARows, preprocess_images
    from medvlm.data.synthetic import PROFILES, questions
    from medvlm.features import with_frozen_features
    from medvlm.metrics import synthetic_labeler
    from medvlm.model.vlm import assemble_medvlm
    from medvlm.train import train_local

    started = time.perf_counter()
    # public data, no privacy: A and B both train (FFA-LoRA then freezes A at this shared start)
    start = replace(cfg, init="random", lora=replace(cfg.lora, ffa=False))
    model = assemble_medvlm(start, resolved=builtin_sources(start), seed=PUBLIC_TUNE_SEED)
    public = PROFILES["public"]
    images, rows, labels = [], [], []
    for k, (contrast, noise, p_invert) in enumerate(PUBLIC_TUNE_SCANNERS):
        scanner = replace(public, contrast=contrast, noise=noise, p_invert=p_invert, stream=public.stream + 1 + k)
        part = generate_hospital(scanner, PUBLIC_TUNE_IMAGES // len(PUBLIC_TUNE_SCANNERS), seed=PUBLIC_TUNE_SEED)
        rows += [{"image_index": len(images) + i, "question": q, "answer": a, "answer_type": t, "qtype": kind}
                 for i, f in enumerate(part.findings) for q, a, t, kind in questions(f)]
        images += list(part.images)
        labels += [synthetic_labeler(report_text(f)) | {f"modality:{f.modality}"} for f in part.findings]
    data = with_frozen_features(model, VQARows(preprocess_images(images, model.vision.preprocess), rows))
    align = align_fusion(model, data.pixels, labels, progress=progress)
    log.info("public stage 1: fusion aligned to %d report finding labels (loss %.3f -> %.3f)", len(align["labels"]),
             align["initial_loss"], align["loss"])
    train = TrainConfig(epochs=PUBLIC_TUNE_EPOCHS, batch_size=PUBLIC_TUNE_BATCH,
                        physical_batch_size=PUBLIC_TUNE_BATCH, lr=PUBLIC_TUNE_LR, seed=PUBLIC_TUNE_SEED,
                        device="cpu")
    log.info("tuning fusion + LoRA on the public corpus (%d questions, once; cached)", len(rows))
    result = train_local(model, data, train=train, privacy=PrivacyConfig(enabled=False), progress=progress)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in result.state.items()}, str(tmp))
    log.info("public stage-1/2 state in %.1fs (loss %.3f) -> %s", time.perf_counter() - started,
             result.metrics["train_loss"], path)
    return path
