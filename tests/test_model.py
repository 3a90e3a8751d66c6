import numpy as np
import pytest
import torch

from medvlm.build import build_medvlm
from medvlm.tensors import TrainableStateError


def test_trainable_is_exactly_lora_and_fusion(tiny_model):
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    names = set(tiny_model.trainable_state())
    assert names and len(trainable) == len(names)
    for n in names:
        assert n.startswith("fusion.") or (n.startswith("language.") and "lora_" in n), n
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert not any(p.requires_grad for p in tiny_model.vision.parameters())
    t, total = tiny_model.count_parameters()
    assert 0 < t < total


def test_state_round_trip(tiny_cfg, tiny_model):
    other = build_medvlm(tiny_cfg.model, seed=1)
    state = tiny_model.trainable_state()
    assert any(not torch.equal(state[k], v) for k, v in other.trainable_state().items())
    other.load_trainable_state({k: v.numpy() for k, v in state.items()})
    for k, v in other.trainable_state().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update({"vision.visual.conv1.weight": torch.zeros(1)}), "unknown tensor"),
    (lambda s: s.update({"language.base_model.model.lm_head.weight": torch.zeros(1)}), "unknown tensor"),
    (lambda s: s.update({"fusion.out_proj.proj.bias": torch.zeros(3)}), "fusion.out_proj.proj.bias.*shape"),
    (lambda s: s.update({"fusion.out_proj.proj.bias": s["fusion.out_proj.proj.bias"].double()}), "fusion.out_proj.proj.bias.*dtype"),
    (lambda s: s["fusion.out_proj.proj.weight"].view(-1)[0].fill_(float("nan")), "fusion.out_proj.proj.weight.*NaN"),
    (lambda s: s.pop("fusion.out_proj.proj.weight"), "missing"),
])
def test_load_refuses_bad_tensors(tiny_model, mutate, message):
    before = tiny_model.trainable_state()
    state = tiny_model.trainable_state()
    mutate(state)
    with pytest.raises(TrainableStateError, match=message):
        tiny_model.load_trainable_state(state)
    for k, v in tiny_model.trainable_state().items():  # nothing half-loaded
        assert torch.equal(v, before[k])


def test_forward_shapes_and_generate(tiny_model, tiny_splits):
    from medvlm.data.dataset import VQADataset, encode_pair, prompt_text

    ds = VQADataset(tiny_splits["train"], tiny_model.tokenizer, tiny_model.cfg.max_text_len)
    pixels, ids, mask, labels = (t.unsqueeze(0) for t in ds[0])
    logits, targets = tiny_model(pixels, ids, mask, labels)
    assert logits.shape[:2] == targets.shape == (1, tiny_model.cfg.max_text_len - 1)
    prompt, _ = encode_pair(tiny_model.tokenizer, prompt_text("is the heart enlarged?"), None, 32)
    out = tiny_model.generate(pixels.repeat(2, 1, 1, 1), torch.tensor([prompt, prompt]), max_new_tokens=3)
    assert len(out) == 2 and out[0] == out[1]                        # greedy: the same input, the same answer
    assert tiny_model.generate(pixels, torch.tensor([prompt]), max_new_tokens=3) == out[:1]   # batch-independent
    assert len(tiny_model.tokenizer(out[0], add_special_tokens=False)["input_ids"]) <= 3


def test_mlp_fusion(tiny_cfg):
    from dataclasses import replace

    cfg = replace(tiny_cfg.model, fusion=replace(tiny_cfg.model.fusion, kind="mlp"))
    model = build_medvlm(cfg)
    patches = torch.randn(2, model.vision.num_patches, model.vision.width)
    out = model.fusion(patches)
    assert out.shape == (2, model.vision.num_patches, model.language.get_input_embeddings().embedding_dim)


def test_qformer_output_is_num_queries_tokens(tiny_model):
    patches = torch.randn(3, tiny_model.vision.num_patches, tiny_model.vision.width)
    assert tiny_model.fusion(patches).shape[:2] == (3, tiny_model.cfg.fusion.num_queries)


def test_unknown_lora_target(tiny_cfg):
    from dataclasses import replace

    cfg = replace(tiny_cfg.model, lora=replace(tiny_cfg.model.lora, target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="query_key_value.*not found"):
        build_medvlm(cfg)


def test_numpy_state_dtype_checked(tiny_model):
    state = {k: v.numpy().astype(np.float64) for k, v in tiny_model.trainable_state().items()}
    with pytest.raises(TrainableStateError, match="dtype float64"):
        tiny_model.load_trainable_state(state)


def test_fusion_init_from_file(tiny_cfg, tiny_model, tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    fusion = {k[len("fusion."):]: v for k, v in tiny_model.trainable_state().items() if k.startswith("fusion.")}
    save_file(fusion, str(tmp_path / "fusion.safetensors"))
    cfg = replace(tiny_cfg.model, fusion=replace(tiny_cfg.model.fusion, init=str(tmp_path / "fusion.safetensors")))
    other = build_medvlm(cfg, seed=7)
    for k, v in other.trainable_state().items():
        if k.startswith("fusion."):
            assert torch.equal(v, tiny_model.trainable_state()[k]), k


def test_public_init_needs_the_builtin_models(tiny_cfg):
    from dataclasses import replace

    with pytest.raises(ValueError, match="builtin:tiny"):
        build_medvlm(replace(tiny_cfg.model, init="public"))


def test_fusion_init_file_must_be_complete(tiny_cfg, tiny_model, tmp_path):
    from dataclasses import replace

    from medvlm.model.vlm import save_fusion

    state = tiny_model.trainable_state()
    state.pop("fusion.queries.weight")
    save_fusion(state, tmp_path / "partial.safetensors")
    cfg = replace(tiny_cfg.model, fusion=replace(tiny_cfg.model.fusion, init=str(tmp_path / "partial.safetensors")))
    with pytest.raises(TrainableStateError, match="fusion.queries.weight"):
        build_medvlm(cfg)
    cfg = replace(tiny_cfg.model, fusion=replace(tiny_cfg.model.fusion, init=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_medvlm(cfg)


def test_coordinator_skeleton_never_loads_the_llm_and_exports_a_peft_adapter(tiny_cfg, tiny_model, tmp_path):
    """The server's model: same allow-list as a hospital's, base LLM on the meta device, and its
    export loads with PeftModel.from_pretrained onto the real base LM, reproducing the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medvlm.build import build_skeleton, language_source
    from medvlm.runs import export_trainable

    skeleton = build_skeleton(tiny_cfg.model, seed=3)
    assert skeleton.trainable_spec() == tiny_model.trainable_spec()
    base_devices = {p.device.type for n, p in skeleton.language.named_parameters() if "lora_" not in n}
    assert base_devices == {"meta"}
    assert all(p.device.type == "cpu" for p in skeleton.trainable_parameters().values())

    trained = {k: torch.randn_like(v) * 0.1 for k, v in tiny_model.trainable_state().items()}
    skeleton.load_trainable_state(trained)
    export_trainable(skeleton, tmp_path / "global")
    tiny_model.load_trainable_state(trained)
    base = AutoModelForCausalLM.from_pretrained(language_source(tiny_cfg.model.language))
    peft = PeftModel.from_pretrained(base, str(tmp_path / "global")).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, tiny_model.language(input_ids=ids).logits, atol=1e-5)


def test_model_init_from_an_exported_adapter_folder(tiny_cfg, tiny_model, tmp_path):
    from dataclasses import replace

    from medvlm.runs import export_trainable

    trained = {k: torch.randn_like(v) for k, v in tiny_model.trainable_state().items()}
    tiny_model.load_trainable_state(trained)
    export_trainable(tiny_model, tmp_path / "global")
    again = build_medvlm(replace(tiny_cfg.model, init=str(tmp_path / "global")), seed=9)
    assert all(torch.equal(v, trained[k]) for k, v in again.trainable_state().items())
    with pytest.raises(ValueError, match="choose one"):
        replace(tiny_cfg.model, init="public", fusion=replace(tiny_cfg.model.fusion, init="x.safetensors"))


def test_a_damaged_exported_file_is_named_with_what_to_do(tiny_model, tmp_path):
    """An exported adapter folder copied in part (a file cut short, base.json truncated): loading it names the
    file and says to restore it (safetensors' 'invalid header length' or a JSON traceback before), and
    nothing is loaded."""
    import shutil

    from medvlm.runs import export_trainable, load_trainable

    before = tiny_model.trainable_state()
    good = export_trainable(tiny_model, tmp_path / "global")
    for name, cut in (("fusion.safetensors", 100), ("adapter_model.safetensors", 300), ("base.json", 10)):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(good, broken)
        (broken / name).write_bytes((good / name).read_bytes()[:cut])
        with pytest.raises(ValueError) as info:
            load_trainable(tiny_model, broken)
        assert str(broken / name) in str(info.value) and "restore it from a copy" in str(info.value), name
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.trainable_state().items())


def test_stage1_alignment_trains_only_the_fusion_towards_report_findings(tiny_model, tiny_splits):
    """Public stage 1: the fusion learns the finding labels of each image's report through a
    throw-away head; LoRA is untouched and the caller's trainable flags are restored."""
    from medvlm.metrics import synthetic_labeler
    from medvlm.recipes.foundation import align_fusion

    data = tiny_splits["train"]
    report = {r["image_index"]: r["report"] for r in data.rows}
    labels = [synthetic_labeler(report[i]) for i in range(len(data.pixels))]
    features = tiny_model.encode_images(data.pixels)
    before = tiny_model.trainable_state()
    flags = {n: p.requires_grad for n, p in tiny_model.trainable_parameters().items()}
    out = align_fusion(tiny_model, features, labels, epochs=60, batch_size=8, lr=1e-2, progress=False)
    after = tiny_model.trainable_state()
    assert set(out["labels"]) == set().union(*labels)
    assert out["loss"] < 0.7 * out["initial_loss"], out
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("fusion."), name
    assert {n: p.requires_grad for n, p in tiny_model.trainable_parameters().items()} == flags


def test_the_model_package_never_builds_what_a_config_names():
    """``builtin:`` sources are resolved above the model (``medvlm.build``); the model code refuses
    them instead of quietly pretraining a foundation."""
    from medvlm.build import resolve_sources
    from medvlm.config import LanguageConfig, ModelConfig, VisionConfig
    from medvlm.model.language import language_model_dir
    from medvlm.model.vision import build_vision_encoder

    with pytest.raises(ValueError, match="not resolved.*medvlm.build"):
        build_vision_encoder(VisionConfig(source="builtin:tiny"))
    with pytest.raises(ValueError, match="not resolved.*medvlm.build"):
        language_model_dir(LanguageConfig(source="builtin:tiny"))
    local = ModelConfig(vision=VisionConfig(source="local-dir:/models/clip"), language=LanguageConfig(source="/models/lm"))
    assert resolve_sources(local) is local                     # nothing to resolve, nothing built


def test_a_row_longer_than_max_text_len_is_said(tiny_model, caplog):
    from medvlm.data.dataset import VQADataset, VQARows, encode_rows

    tok, max_len = tiny_model.tokenizer, tiny_model.cfg.max_text_len
    long_q = "given the patient's history of smoking and prior films " * 4 + "is there a nodule?"
    rows = [{"image_index": 0, "question": "is there a nodule?", "answer": "yes", "answer_type": "closed"},
            {"image_index": 0, "question": long_q, "answer": "yes", "answer_type": "closed"},
            {"image_index": 0, "question": "what is seen?", "answer": "a mass " * 30, "answer_type": "open"}]
    with caplog.at_level("WARNING", logger="medvlm.data.dataset"):
        VQADataset(VQARows(torch.zeros(1, 3, 8, 8), rows), tok, max_len)
    said = [r.getMessage() for r in caplog.records]
    assert any(f"2 of 3 rows are longer than model.max_text_len={max_len}" in m and "lose their start" in m
               and "given the patient" in m for m in said), said   # the long question, named (the long
    #                                                                 answer left its prompt 4 tokens)
    assert any("1 of 3 rows" in m and "lose their end" in m and "a mass" in m for m in said), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvlm.data.dataset"):
        encode_rows(tok, rows[:1], max_len)
    assert not caplog.records                                           # a row that fits: nothing said
    ids, labels = encode_rows(tok, rows[1:2], max_len)[0]
    assert len(ids) == max_len and ids[-1] == tok.eos_token_id          # still cut from the start, eos kept
