"""The composed Med-VLM: frozen vision tower -> trainable fusion -> frozen LLM + LoRA.

``trainable_state()`` / ``load_trainable_state()`` are the only way weights leave or enter a
model: names are ``fusion.<param>`` and ``language.<...lora_...>``, and the allow-list of
(name, shape, dtype) is derived from the model itself (:meth:`MedVLM.trainable_spec`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import ModelConfig
from medvlm.data.dataset import IGNORE_INDEX
from medvlm.model.fusion import build_fusion
from medvlm.model.language import build_language_model
from medvlm.model.vision import build_vision_encoder
from medvlm.tensors import TensorSpec, spec_of, validate_state

# what to do with an exported or checkpointed weight file that cannot be read
RESTORE = "restore it from a copy (a run keeps every round's in checkpoints/round-NNN/)"


def save_fusion(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write the ``fusion.*`` tensors of a trainable state as safetensors (prefix dropped), atomically."""
    from safetensors.torch import save_file

    from medvlm.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k[len("fusion."):]: v.contiguous() for k, v in state.items() if k.startswith("fusion.")}, str(tmp))
    return Path(path)


def read_fusion(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a fusion safetensors file back into trainable-state names (``fusion.<param>``)."""
    from medvlm.files import read_tensors

    if not Path(path).is_file():
        raise FileNotFoundError(f"fusion weights {path} not found")
    return {f"fusion.{k}": v for k, v in read_tensors(path, RESTORE).items()}


@torch.no_grad()
def _load(params: Mapping[str, nn.Parameter], state: Mapping[str, object], *, strict: bool) -> None:
    """Validate ``state`` against ``params`` (nothing is loaded if one tensor is wrong), then copy it in."""
    validate_state(state, spec_of(params), strict=strict)
    for name, value in state.items():
        params[name].copy_(torch.from_numpy(value) if isinstance(value, np.ndarray) else value)


class MedVLM(nn.Module):
    def __init__(self, vision: nn.Module, fusion: nn.Module, language: nn.Module, tokenizer, cfg: ModelConfig):
        super().__init__()
        self.vision = vision
        self.fusion = fusion
        self.language = language  # peft.PeftModel around the frozen causal LM
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._adapter = self._collect_adapter()
        # FFA-LoRA: the A matrices stay frozen at their shared initialisation, never trained or sent
        self._trainable = {n: p for n, p in self._adapter.items() if not (cfg.lora.ffa and ".lora_A." in n)}

    # ------------------------------------------------------------------ parameters
    def _collect_adapter(self) -> dict[str, nn.Parameter]:
        """Fusion + every LoRA tensor: what an exported adapter holds."""
        params: dict[str, nn.Parameter] = {}
        for name, p in self.fusion.named_parameters():
            params[f"fusion.{name}"] = p
        for name, p in self.language.named_parameters():
            if "lora_" in name:
                params[f"language.{name}"] = p
        return params

    def adapter_spec(self) -> dict[str, TensorSpec]:
        return spec_of(self._adapter)

    def load_adapter_state(self, state: Mapping[str, object], *, strict: bool = True) -> None:
        """Load fusion + LoRA tensors including the ones FFA-LoRA keeps frozen (initialisation, exports)."""
        _load(self._adapter, state, strict=strict)

    def frozen_digest(self) -> Optional[str]:
        """FFA-LoRA: a fingerprint of the frozen A matrices, which every site must share for the
        average of the B matrices to be the average of the products BA. None without FFA."""
        if not self.cfg.lora.ffa:
            return None
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(set(self._adapter) - set(self._trainable)):
            digest.update(name.encode())
            digest.update(self._adapter[name].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def freeze_base(self, parts: Sequence[str] = ("fusion", "lora")) -> None:
        """Trainable = fusion.* and/or LoRA tensors, nothing else (vision tower and base LLM stay frozen)."""
        self.requires_grad_(False)
        for name, p in self._trainable.items():
            part = "fusion" if name.startswith("fusion.") else "lora"
            p.requires_grad_(part in parts)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._trainable)

    def trainable_spec(self) -> dict[str, TensorSpec]:
        return spec_of(self._trainable)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly the LoRA + fusion tensors, by name, detached copies on the CPU."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self._trainable.items()}

    def load_trainable_state(self, state: Mapping[str, object], *, strict: bool = True) -> None:
        _load(self._trainable, state, strict=strict)

    def count_parameters(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self._trainable.values()), total

    # ------------------------------------------------------------------ forward
    @property
    def device(self) -> torch.device:
        return next(self.fusion.parameters()).device

    def _visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images: pixels (B, 3, H, W), or the frozen tower's patch tokens (B, P, Dv) when the
        caller encoded them once up front (see :meth:`encode_images`)."""
        if images.dim() == 4:
            images = self.encode_images(images)                 # (B, P, Dv)
        visual = self.fusion(images.float())                    # (B, Q, Dl); fp32: DP-SGD clips its grads
        return visual.to(self.language.get_input_embeddings().weight.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen vision tower (autocast on GPU): pixels (B, 3, H, W) -> patch tokens (B, P, Dv)."""
        with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16,
                            enabled=pixels.device.type == "cuda"):
            return self.vision(pixels).float()

    def _embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        visual = self._visual_tokens(images)                                   # (B, Q, Dl)
        text = self.language.get_input_embeddings()(input_ids)                 # (B, T, Dl)
        return torch.cat([visual, text], dim=1)                                # (B, Q+T, Dl)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits over the text (B, T-1, V) and their targets (B, T-1).

        The loss is left to :func:`sequence_loss` (or to Opacus' ghost-clipping criterion,
        which computes the same per-sequence masked mean from logits and targets).
        """
        embeds = self._embed(images, input_ids)                 # (B, Q+T, Dl)
        n_vis = embeds.shape[1] - input_ids.shape[1]
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n_vis), attention_mask], dim=1)
        logits = self.language(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q+T, V)
        return logits[:, n_vis:-1].float(), labels[:, 1:]       # predict text token t+1 from t


    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, *, max_new_tokens: int = 8) -> list[str]:
        """Greedy answers for a batch whose prompts all have the same length (no padding)."""
        embeds = self._embed(images, prompt_ids)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        tok = self.tokenizer
        out = self.language.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [tok.decode(seq, skip_special_tokens=True).strip() for seq in out]


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example loss (B,): masked mean over each sequence's answer tokens.

    Per-sequence losses (not a token-weighted batch mean) keep each example's share of the
    gradient independent of the others', as DP-SGD's per-example clipping assumes; callers
    take ``.mean()`` over the batch (Opacus ``loss_reduction="mean"``).
    """
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    valid = (targets != IGNORE_INDEX).float()
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1.0)


@torch.no_grad()
def seed_lora_a(language: nn.Module, seed: int) -> None:
    """Initialise every LoRA A matrix from (seed, its name) alone, as PEFT does (Kaiming-uniform,
    a=sqrt(5)) but independent of how much randomness loading the model consumed first: a hospital
    that loads the real LM and a coordinator that builds it on the meta device get the same A.
    FFA-LoRA needs that (A is frozen and never sent; B starts at zero); without FFA the coordinator
    sends A, so PEFT's own draw stands (and the public start built from it stays valid)."""
    import hashlib
    import math

    for name, p in language.named_parameters():
        if ".lora_A." in name:
            key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
            generator = torch.Generator(device="cpu").manual_seed(key)
            value = torch.empty(p.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
            p.copy_(value.to(p.dtype))


def assemble_medvlm(cfg: ModelConfig, *, resolved: Optional[ModelConfig] = None, seed: int = 0) -> MedVLM:
    """Vision (frozen), language (frozen + LoRA) and fusion (fresh, seeded), loaded from the local
    sources of ``resolved`` (default: ``cfg``'s own) and recorded as ``cfg``. Nothing is built,
    trained or fetched here, and no start state is applied: ``medvlm.build`` does both."""
    src = resolved or cfg
    vision = build_vision_encoder(src.vision)
    vision.source = cfg.vision.source   # what the config named (builtin:tiny), not where it was found
    torch.manual_seed(seed)  # LoRA A and fusion initialisation are seeded
    language, tokenizer = build_language_model(src.language, src.lora)
    if cfg.lora.ffa:   # A is never sent: every site must draw the same one
        seed_lora_a(language, seed)
    embeddings = language.get_input_embeddings().weight
    fusion = build_fusion(cfg.fusion, vision_width=vision.width, lm_width=embeddings.shape[1],
                          embed_rms=float(embeddings.detach().float().pow(2).mean().sqrt()))
    model = MedVLM(vision, fusion, language, tokenizer, cfg)
    model.freeze_base()
    return model


def assemble_skeleton(cfg: ModelConfig, *, resolved: Optional[ModelConfig] = None, seed: int = 0) -> MedVLM:
    """The model as a coordinator holds it: the LLM's base weights are never loaded (they stay on the
    meta device); the LoRA tensors and the fusion module are real and freshly initialised (seeded).
    Its allow-list equals ``assemble_medvlm(cfg).trainable_spec()``, it loads and exports trainable
    states, and it cannot run forward."""
    from medvlm.model.language import build_language_skeleton

    src = resolved or cfg
    vision = build_vision_encoder(src.vision)
    torch.manual_seed(seed)
    language = build_language_skeleton(src.language, src.lora)
    if cfg.lora.ffa:
        seed_lora_a(language, seed)
    lm_width = language.get_input_embeddings().weight.shape[1]
    fusion = build_fusion(cfg.fusion, vision_width=vision.width, lm_width=lm_width, embed_rms=1.0)
    return MedVLM(vision, fusion, language, None, cfg)
