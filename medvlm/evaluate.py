"""Run a model over questions and score it (with the per-question-majority baseline)."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from medvlm.data.dataset import VQARows, encode_pair
from medvlm.features import with_frozen_features
from medvlm.metrics import accuracies, baseline_predictions, majority_answers, vqa_counts
from medvlm.model.vlm import MedVLM


@torch.no_grad()
def predict(model: MedVLM, data: VQARows, *, max_new_tokens: int = 8, batch_size: int = 128,
            progress: bool = False) -> list[str]:
    """Greedy answers, batched by prompt length so no prompt is padded (exact generation)."""
    model.eval()
    device = model.device
    data = with_frozen_features(model, data)
    max_len = model.cfg.max_text_len
    groups: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for i, r in enumerate(data.rows):
        ids, _ = encode_pair(model.tokenizer, r["question"], None, max_len)
        groups[len(ids)].append((i, ids))
    answers: list[str] = [""] * len(data.rows)
    batches = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        idx = [i for i, _ in batch]
        prompt = torch.tensor([ids for _, ids in batch], device=device)
        pixels = data.pixels[[data.rows[i]["image_index"] for i in idx]].to(device)
        for i, text in zip(idx, model.generate(pixels, prompt, max_new_tokens=max_new_tokens)):
            answers[i] = text
    return answers


def evaluate_counts(model: MedVLM, data: VQARows, *, max_new_tokens: int = 8, progress: bool = False) -> dict:
    """Aggregate correct/total counts only: what a hospital may report."""
    return vqa_counts(predict(model, data, max_new_tokens=max_new_tokens, progress=progress), data.rows)


def evaluate_with_baseline(model: MedVLM, data: VQARows, train_rows: list[dict], *, max_new_tokens: int = 8,
                           progress: bool = False) -> dict:
    result = accuracies(evaluate_counts(model, data, max_new_tokens=max_new_tokens, progress=progress))
    base = accuracies(vqa_counts(baseline_predictions(majority_answers(train_rows), data.rows), data.rows))
    result["baseline"] = base
    return result
