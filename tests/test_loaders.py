"""The real loaders, exercised on tiny models saved to temp dirs through exactly the path a
hospital uses for BiomedCLIP (an open_clip directory) and a 7B LLM (a save_pretrained dir)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from medvlm.config import LanguageConfig, LoraSettings, VisionConfig
from medvlm.model.language import build_language_model
from medvlm.model.vision import build_vision_encoder
from medvlm.recipes.foundation import BUILTIN_DIR, train_tokenizer

TINY_VIT = json.loads((BUILTIN_DIR / "tiny_vit.json").read_text())


def _save_clip(directory: Path, config: dict, weights_name: str) -> dict:
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(123)
    clip = open_clip.create_model("local-dir:" + str(directory), pretrained_text=False)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(directory / weights_name))
    else:
        torch.save(state, directory / weights_name)
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


@pytest.mark.parametrize("weights_name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_local_open_clip_directory(tmp_path, weights_name):
    saved = _save_clip(tmp_path / "clip", TINY_VIT, weights_name)
    enc = build_vision_encoder(VisionConfig(source=f"local-dir:{tmp_path / 'clip'}"))
    for k, v in enc.visual.state_dict().items():
        assert torch.equal(v, saved[k]), k
    tokens = enc(torch.zeros(2, 3, 64, 64))
    assert tokens.shape == (2, enc.num_patches, enc.width) == (2, 64, TINY_VIT["model_cfg"]["vision_cfg"]["width"])
    assert not any(p.requires_grad for p in enc.parameters())


def test_biomedclip_layout_with_local_hf_text_tower(tmp_path):
    """BiomedCLIP's config names a hub text model; it must load from a local directory instead."""
    from transformers import BertConfig, BertModel

    bert_dir = tmp_path / "BiomedBERT"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).config.save_pretrained(bert_dir)
    cfg = copy.deepcopy(TINY_VIT)
    cfg["model_cfg"]["text_cfg"] = {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                    "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                    "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                    "context_length": 32}
    local = copy.deepcopy(cfg)
    local["model_cfg"]["text_cfg"].update(hf_model_name=str(bert_dir), hf_tokenizer_name=str(bert_dir))
    saved = _save_clip(tmp_path / "BiomedCLIP", local, "open_clip_pytorch_model.bin")
    (tmp_path / "BiomedCLIP" / "open_clip_config.json").write_text(json.dumps(cfg))  # as published: hub names

    with pytest.raises(ValueError, match="hf_text_dir"):
        build_vision_encoder(VisionConfig(source=f"local-dir:{tmp_path / 'BiomedCLIP'}"))
    enc = build_vision_encoder(VisionConfig(source=f"local-dir:{tmp_path / 'BiomedCLIP'}", hf_text_dir=str(bert_dir)))
    for k, v in enc.visual.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_missing_open_clip_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_vision_encoder(VisionConfig(source=f"local-dir:{tmp_path}"))


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
                                           ("bloom", ["query_key_value"])])
def test_local_causal_lm_directory(tmp_path, arch, targets):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = train_tokenizer(["question: is there a nodule? answer: yes", "no acute findings."] * 20, 300)
    sizes = {"llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
             "gpt2": dict(n_embd=32, n_layer=1, n_head=2),
             "bloom": dict(hidden_size=32, n_layer=1, n_head=2)}[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=len(tok), **sizes))
    base.eval()  # dropout off (GPT-2 has some), as from_pretrained leaves it
    base.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model, tokenizer = build_language_model(LanguageConfig(source=str(tmp_path / arch)), LoraSettings(target_modules=targets))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)  # LoRA B=0: same function
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_lm_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_language_model(LanguageConfig(source=str(tmp_path)), LoraSettings())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_language_model(LanguageConfig(source=str(tmp_path / "nope")), LoraSettings())
