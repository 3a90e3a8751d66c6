"""Run a model over questions (or images, for reports) and score it next to the trivial baseline."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from medvlm.data.dataset import VQARows, encode_rows
from medvlm.features import with_frozen_features
from medvlm.metrics import baseline_for, counts_for, scores, synthetic_labeler
from medvlm.model.vlm import MedVLM


@torch.no_grad()
def predict(model: MedVLM, data: VQARows, *, max_new_tokens: int = 8, batch_size: int = 128,
            progress: bool = False) -> list[str]:
    """Greedy answers, batched by prompt length so no prompt is padded (exact generation)."""
    model.eval()
    device = model.device
    data = with_frozen_features(model, data)
    max_len = model.cfg.max_text_len
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = defaultdict(list)
    for i, (r, (ids, _)) in enumerate(zip(data.rows, encode_rows(model.tokenizer, data.rows, max_len, answers=False))):
        # a report may run to the text length the model trained on; a short answer stops early
        budget = max(max_new_tokens, max_len - len(ids)) if r.get("answer_type") == "report" else max_new_tokens
        groups[(len(ids), budget)].append((i, ids))
    answers: list[str] = [""] * len(data.rows)
    batches = [(key[1], g[s:s + batch_size]) for key, g in groups.items() for s in range(0, len(g), batch_size)]
    for budget, batch in tqdm(batches, desc="generate", disable=not progress):
        idx = [i for i, _ in batch]
        prompt = torch.tensor([ids for _, ids in batch], device=device)
        pixels = data.pixels[[data.rows[i]["image_index"] for i in idx]].to(device)
        for i, text in zip(idx, model.generate(pixels, prompt, max_new_tokens=budget)):
            answers[i] = text
    return answers


def evaluate_counts(model: MedVLM, data: VQARows, *, max_new_tokens: int = 8, progress: bool = False,
                    labeler=synthetic_labeler) -> dict:
    """Aggregate counts only (VQA correct/total, or report BLEU/ROUGE/finding statistics): what a
    hospital may report."""
    return counts_for(predict(model, data, max_new_tokens=max_new_tokens, progress=progress), data.rows, labeler)


def baseline_counts(data: VQARows, train_rows: list[dict], *, labeler=synthetic_labeler) -> dict:
    """The trivial baseline's counts on ``data`` (per-question majority, or the most common report)."""
    return counts_for(baseline_for(train_rows, data.rows), data.rows, labeler)


def evaluate_with_baseline(model: MedVLM, data: VQARows, train_rows: list[dict], *, max_new_tokens: int = 8,
                           progress: bool = False, labeler=synthetic_labeler) -> dict:
    result = scores(evaluate_counts(model, data, max_new_tokens=max_new_tokens, progress=progress, labeler=labeler))
    result["baseline"] = scores(baseline_counts(data, train_rows, labeler=labeler))
    return result
