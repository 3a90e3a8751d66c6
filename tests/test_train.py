from dataclasses import replace

import pytest
import torch

from medvlm.build import build_medvlm
from medvlm.config import PrivacyConfig, TrainConfig
from medvlm.data.dataset import VQARows
from medvlm.privacy import (PrivacyBudgetExceeded, calibrate_noise, epsilon, load_accountant_state,
                            save_accountant_state)
from medvlm.train import calibrated, lr_factor, train_local

FAST = TrainConfig(epochs=1, batch_size=16, physical_batch_size=8, lr=1e-2)


def small(rows: VQARows, n: int) -> VQARows:
    return rows.select(rows.rows[:n])


def test_frozen_weights_byte_identical_after_dp_training(tiny_model, tiny_splits):
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if not p.requires_grad}
    before = tiny_model.trainable_state()
    data = small(tiny_splits["train"], 64)
    privacy = calibrated(PrivacyConfig(), len(data), FAST, max_steps=3)
    result = train_local(tiny_model, data, train=FAST, privacy=privacy, max_steps=3, progress=False)
    for n, p in tiny_model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen weight {n} changed"
    changed = [k for k, v in result.state.items() if not torch.equal(v, before[k])]
    assert changed, "no trainable tensor changed"
    assert set(result.state) == set(before)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_step_equals_plain_step_without_noise_or_clipping(tiny_cfg, tiny_splits, mode):
    """Guards silent LoRA-update corruption seen with some Opacus + PEFT version pairs."""
    data = small(tiny_splits["train"], 12)
    # batch_size >= N: sample rate 1, so the Poisson batch is the whole set, like the plain batch
    train = replace(FAST, batch_size=12, physical_batch_size=12, optimizer="sgd", lr=0.5)
    plain = build_medvlm(tiny_cfg.model, seed=0)
    dp = build_medvlm(tiny_cfg.model, seed=0)
    # make LoRA B non-zero so that LoRA A receives gradient too
    start = {k: (v + 0.05 * torch.randn_like(v) if "lora_B" in k else v) for k, v in plain.trainable_state().items()}
    plain.load_trainable_state(start)
    dp.load_trainable_state(start)
    a = train_local(plain, data, train=train, privacy=PrivacyConfig(enabled=False), max_steps=1, progress=False)
    no_noise = PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1e9, grad_sample_mode=mode)
    b = train_local(dp, data, train=train, privacy=no_noise, max_steps=1, progress=False)
    moved = 0
    for k, v in a.state.items():
        assert torch.allclose(v, b.state[k], rtol=1e-4, atol=1e-6), f"{mode}: {k} differs"
        moved += int(not torch.equal(v, start[k]))
    assert moved > len(a.state) // 2
    assert any("lora_A" in k and not torch.equal(a.state[k], start[k]) for k in a.state)


def test_dp_noise_and_batches_are_fresh_in_every_call_while_plain_training_repeats(tiny_cfg, tiny_splits):
    """Two hospitals (or one hospital in two rounds) with the same train.seed must not draw the same DP
    noise: the coordinator knows the seed, and noise it can regenerate protects nothing (before the
    fix the two updates below had cosine 1.0000). Without DP the seed still makes a run repeatable."""
    data = small(tiny_splits["train"], 32)
    train = replace(FAST, batch_size=16, physical_batch_size=16, optimizer="sgd", lr=0.1)
    noisy = PrivacyConfig(target_epsilon=None, noise_multiplier=50.0)   # the update is almost all noise

    def update(privacy: PrivacyConfig) -> torch.Tensor:
        model = build_medvlm(tiny_cfg.model, seed=0)
        start = model.trainable_state()
        end = train_local(model, data, train=train, privacy=privacy, max_steps=1, progress=False).state
        return torch.cat([(end[k] - start[k]).flatten() for k in start])

    a, b = update(noisy), update(noisy)
    assert a.norm() > 0 and b.norm() > 0
    assert abs(float(torch.nn.functional.cosine_similarity(a, b, dim=0))) < 0.1
    plain = PrivacyConfig(enabled=False)
    assert torch.equal(update(plain), update(plain))


def test_epsilon_grows_and_survives_save_restore(tiny_model, tiny_splits, tmp_path):
    data = small(tiny_splits["train"], 64)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0)
    r1 = train_local(tiny_model, data, train=FAST, privacy=privacy, max_steps=2, progress=False)
    save_accountant_state(r1.accountant_state, tmp_path / "acc.json")
    restored = load_accountant_state(tmp_path / "acc.json")
    r2 = train_local(tiny_model, data, train=FAST, privacy=privacy, accountant_state=restored, max_steps=3,
                     progress=False)
    assert 0 < r1.privacy.epsilon < r2.privacy.epsilon
    assert r2.privacy.total_steps == 5 and r2.privacy.steps == 3
    # epsilon is recomputable from the mechanism alone
    assert abs(epsilon([(1.0, r1.privacy.sample_rate, 5)], delta=1e-5) - r2.privacy.epsilon) < 1e-9
    # a fresh start without the state would under-report
    r3 = train_local(tiny_model, data, train=FAST, privacy=privacy, max_steps=3, progress=False)
    assert r3.privacy.epsilon < r2.privacy.epsilon


def test_target_epsilon_accounts_for_prior_spending(tiny_model, tiny_splits):
    data = small(tiny_splits["train"], 64)
    privacy = PrivacyConfig(target_epsilon=3.0)
    r1 = train_local(tiny_model, data, train=FAST, privacy=calibrated(privacy, len(data), FAST, max_steps=2),
                     max_steps=2, progress=False)
    assert 2.9 <= r1.privacy.epsilon <= 3.0 + 0.02
    # the same target again: only the sliver left may be spent, with far more noise
    again = calibrated(privacy, len(data), FAST, accountant_state=r1.accountant_state, max_steps=2)
    r2 = train_local(tiny_model, data, train=FAST, privacy=again, accountant_state=r1.accountant_state,
                     max_steps=2, progress=False)
    assert r2.privacy.epsilon <= 3.0 + 0.02
    assert r2.privacy.noise_multiplier > 5 * r1.privacy.noise_multiplier
    spent = {"mechanism": "rdp", "history": [(0.5, 0.25, 200)]}  # far past epsilon 3
    with pytest.raises(PrivacyBudgetExceeded, match="already spent"):
        calibrated(privacy, len(data), FAST, accountant_state=spent, max_steps=2)


def test_train_local_adds_the_noise_it_is_given_and_refuses_a_target(tiny_model, tiny_splits):
    data = small(tiny_splits["train"], 16)
    with pytest.raises(ValueError, match="calibrated"):     # a target is planned first, never inside training
        train_local(tiny_model, data, train=FAST, privacy=PrivacyConfig(target_epsilon=8.0), max_steps=1,
                    progress=False)
    sigma = calibrated(PrivacyConfig(target_epsilon=8.0), len(data), FAST, max_steps=1).noise_multiplier
    r = train_local(tiny_model, data, train=FAST, privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=sigma),
                    max_steps=1, progress=False)
    assert r.privacy.noise_multiplier == sigma and 7.9 <= r.privacy.epsilon <= 8.02


def test_calibrate_noise_meets_target():
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.01, steps=1000)
    eps = epsilon([(sigma, 0.01, 1000)], delta=1e-5)
    assert 7.9 <= eps <= 8.0


def test_empty_poisson_batches_are_noise_only_steps(tiny_model, tiny_splits):
    data = small(tiny_splits["train"], 4)
    train = replace(FAST, batch_size=1, epochs=4)  # q = 1/4: about a third of batches are empty
    r = train_local(tiny_model, data, train=train, privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0),
                    progress=False)
    assert r.privacy.total_steps == r.metrics["steps"] == 16
    assert r.metrics["samples_seen"] < 16 * 3


def test_accountant_mechanism_mismatch(tiny_model, tiny_splits):
    with pytest.raises(ValueError, match="keep one accountant"):
        train_local(tiny_model, small(tiny_splits["train"], 8), train=FAST,
                    privacy=PrivacyConfig(accountant="prv"),
                    accountant_state={"mechanism": "rdp", "history": [(1.0, 0.1, 5)]}, progress=False)


def test_model_can_train_again_after_dp(tiny_model, tiny_splits):
    data = small(tiny_splits["train"], 16)
    for _ in range(2):  # Opacus hooks are removed after each call ("hooks twice" otherwise)
        train_local(tiny_model, data, train=FAST, privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0),
                    max_steps=1, progress=False)
    assert not any(hasattr(p, "grad_sample") for p in tiny_model.parameters())


def test_the_planned_sample_rate_is_what_the_accountant_records(tiny_model, tiny_splits):
    """Opacus runs int(1 / (1 / 93)) = 92 batches an epoch for 93 expected batches and records 1 / 92:
    a plan made at 1 / 93 would be charged more than it planned (epsilon over the target)."""
    from medvlm.train import planned_steps

    train = replace(FAST, batch_size=2, physical_batch_size=2)
    data = small(tiny_splits["train"], 186)                       # ceil(186 / 2) = 93 expected batches
    assert len(data) == 186
    sample_rate, _ = planned_steps(len(data), train)
    assert sample_rate == 1 / 92
    privacy = calibrated(PrivacyConfig(target_epsilon=2.0), len(data), train, max_steps=3)
    result = train_local(tiny_model, data, train=train, privacy=privacy, max_steps=3, progress=False)
    assert [tuple(h)[1] for h in result.accountant_state["history"]] == [sample_rate]
    assert result.privacy.epsilon <= 2.0 + 1e-9


def test_rounds_sharing_one_schedule_follow_the_pooled_curve():
    """federation.lr_schedule=stage: four rounds of 10 steps, each over its quarter of the curve, take
    exactly the 40 learning rates one 40-step training takes; the whole window is one warm-up + cosine."""
    pooled = [lr_factor(40)(i) for i in range(40)]
    rounds = [lr_factor(10, ((k - 1) / 4, k / 4))(i) for k in range(1, 5) for i in range(10)]
    assert rounds == pytest.approx(pooled)
    assert pooled[0] == 0.5 and pooled[1] == 1.0 and pooled[-1] < 0.01     # 2 warm-up steps, then down to ~0
    per_round = [lr_factor(10)(i) for i in range(10)]
    assert per_round[0] == 1.0 and per_round[-1] < 0.05 and per_round != pytest.approx(rounds[:10])
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.6, 0.3)):
        with pytest.raises(ValueError, match="window"):
            lr_factor(10, bad)


def test_a_device_name_that_is_no_device_here_is_named_with_the_choices():
    """train.device (or a hospital's node-config device): a typo or a GPU this machine lacks is named with
    the key and the choices, not torch's list of every backend it was ever built for."""
    from medvlm.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for name, said in (("gpu", "is not a device: use auto, cpu, cuda, cuda:N or mps"), ("", "is not a device"),
                       ("cuda:99", r"(CUDA is not available|this machine has \d+ GPU)"),
                       ("mps", "MPS is not available")):
        if name == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(ValueError, match=f"train.device={name!r}.*{said}"):
            resolve_device(name)
