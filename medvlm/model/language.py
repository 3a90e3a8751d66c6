"""Frozen Hugging Face causal LM with PEFT LoRA adapters, and its tokenizer.

One path for every source: ``AutoModelForCausalLM.from_pretrained(directory)``. The built-in
tiny LM is a directory the project writes itself (see ``medvlm.recipes.foundation``), exactly
like a hospital's local copy of a 7B model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from medvlm.config import LanguageConfig, LoraSettings
from medvlm.quiet import MODEL_LOADING, no_progress_bars, quiet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_model_dir(cfg: LanguageConfig) -> str:
    """Resolve the configured source to a local directory (or a hub id, when one was given)."""
    if cfg.source.startswith("builtin:"):
        raise ValueError(f"model.language.source={cfg.source!r} is not resolved: build models with "
                         "medvlm.build.build_medvlm (it turns builtin: sources into local directories)")
    path = Path(cfg.source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.language.source={cfg.source!r}: no config.json there. Point it at a directory "
                "written by save_pretrained (config.json, weights, tokenizer files).")
        return str(path)
    if cfg.source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model.language.source={cfg.source!r} does not exist")
    return cfg.source  # a hub id: only works online, which the user asked for by naming one


def load_tokenizer(directory: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ValueError(f"tokenizer in {directory} has no eos token; answers could not be terminated")
    return tok


def lora_config(lora: LoraSettings) -> LoraConfig:
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def _check_targets(base, lora: LoraSettings, directory: str) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} not found in {directory} "
                         f"({base.config.model_type}); its linear layers include "
                         f"{sorted(n for n in names if 'proj' in n or 'query' in n or 'dense' in n)[:12]}")


def build_language_model(cfg: LanguageConfig, lora: LoraSettings) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    directory = language_model_dir(cfg)
    with no_progress_bars():
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[cfg.dtype])
    base.requires_grad_(False)
    _check_targets(base, lora, directory)
    with quiet(MODEL_LOADING):
        model = get_peft_model(base, lora_config(lora))   # LoRA tensors are the only trainable LM weights
    model.eval()
    return model, load_tokenizer(directory)


def build_language_skeleton(cfg: LanguageConfig, lora: LoraSettings) -> PeftModel:
    """The LoRA-wrapped LM with the frozen base on the *meta* device (no weights read or allocated)
    and real, freshly initialised LoRA tensors: what a coordinator needs to know the allow-list
    and the initial adapter without loading a 7B model."""
    from peft.tuners.lora.layer import LoraLayer
    from transformers import AutoConfig

    directory = language_model_dir(cfg)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    base.requires_grad_(False)
    _check_targets(base, lora, directory)
    with quiet(MODEL_LOADING):
        model = get_peft_model(base, lora_config(lora))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.lora_A[adapter].to_empty(device="cpu")
                module.lora_B[adapter].to_empty(device="cpu")
                module.reset_lora_parameters(adapter, True)
    return model
