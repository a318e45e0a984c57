"""Collapse diagnostics and alarm on known tensors; gradient accumulation equals the big batch; bf16 step."""

from __future__ import annotations

import copy
from pathlib import Path
import logging
import math

import pytest
import torch
from conftest import TINY_ENCODER
from ignite.engine import Engine, Events

from dagman_components.engines import CoDistillationTrainer, MicroBatches, autocast_settings, optimizer_steps_per_epoch
from dagman_components.handlers import CollapseAlarm, TeacherEMAHandler
from dagman_components.optim.schedules import teacher_momentum_schedule, teacher_temperature_schedule
from dagman_components.losses import DAGMaNLoss, attention_diagnostics, distillation_diagnostics, feature_spread
from dagman_components.masking import AttentionGuidedMasking, PatchDropout
from dagman_components.networks import DAGMaNPretrainNetwork, SwinDAGMaN, make_teacher

K = 16


# ---- diagnostics on known tensors


def test_uniform_teacher_has_entropy_ln_k_and_one_hot_has_zero():
    center = torch.zeros(1, K)
    student = torch.zeros(3, K)  # uniform student
    uniform = distillation_diagnostics([(student, torch.full((3, K), 0.3), None)], None, center, 0.04, 0.1)
    assert uniform["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert uniform["student_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert uniform["kl"] == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.zeros(3, K)
    one_hot[:, 2] = 10.0  # 10/0.04 = 250 nats above the others: a one-hot target
    sharp = distillation_diagnostics([(student, one_hot, None)], None, center, 0.04, 0.1)
    assert sharp["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert sharp["kl"] == pytest.approx(math.log(K), abs=1e-4)  # CE of a uniform student against a one-hot target
    assert math.isnan(sharp["spread"]) and sharp["center_norm"] == 0.0


def test_a_centre_equal_to_the_teacher_logit_makes_targets_uniform():
    t = torch.randn(4, K, generator=torch.Generator().manual_seed(0))
    same = t[:1].expand(4, K)
    d = distillation_diagnostics([(torch.zeros(4, K), same, None)], None, t[:1].clone(), 0.04, 0.1)
    assert d["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert d["center_norm"] == pytest.approx(float(t[0].norm()), rel=1e-6)


def test_token_weights_select_masked_cells_like_the_loss():
    teacher = torch.zeros(1, 2, K)
    teacher[0, 0, 0] = 10.0  # cell 0: one-hot target; cell 1: uniform
    only_first = distillation_diagnostics([(torch.zeros(1, 2, K), teacher, torch.tensor([[1.0, 0.0]]))], None,
                                          torch.zeros(1, K), 0.04, 0.1)
    only_second = distillation_diagnostics([(torch.zeros(1, 2, K), teacher, torch.tensor([[0.0, 1.0]]))], None,
                                           torch.zeros(1, K), 0.04, 0.1)
    assert only_first["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert only_second["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5)


def test_feature_spread_is_one_for_axis_directions_and_zero_when_collapsed():
    d = 8
    eye = torch.eye(d)
    assert feature_spread(torch.cat([eye, -eye])) == pytest.approx(1.0, abs=1e-6)  # std 1/sqrt(d) per coordinate
    same = torch.nn.functional.normalize(torch.ones(5, d), dim=-1)
    assert feature_spread(same) == pytest.approx(0.0, abs=1e-6)
    assert feature_spread(eye[:1]) == 0.0  # one sample: no spread
    assert feature_spread(torch.cat([eye, -eye]).reshape(2, d, d)) == pytest.approx(1.0, abs=1e-6)  # tokens count too


def test_attention_diagnostics():
    uniform = attention_diagnostics(torch.full((2, 8), 1 / 8))
    assert uniform == pytest.approx({"entropy": math.log(8), "max": 1 / 8, "log_n": math.log(8)})
    peaked = attention_diagnostics(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert peaked["entropy"] == pytest.approx(0.0, abs=1e-6) and peaked["max"] == 1.0


# ---- the collapse alarm


def _alarm_engine(values: list[dict]) -> Engine:
    def step(engine, i):
        return {"loss": torch.tensor(0.0), "scalars": dict(values[i])}

    return Engine(step)


def _scalars(h: float, spread: float = 0.5) -> dict:
    return {f"{t}/{n}": v for t in ("aitd", "ampd", "gitd") for n, v in (("teacher_entropy", h), ("spread", spread))}


def test_uniform_teacher_raises_the_alarm_after_warmup_and_patience(caplog):
    loss = DAGMaNLoss(out_dim=K)
    # diagnostics of a real uniform teacher: every term at ln K
    out = {"cls_logits": torch.zeros(2, K), "global_logits": torch.zeros(2, K), "patch_logits": torch.zeros(2, 4, K)}
    diag = loss.diagnostics((out, out), (out, out), (torch.ones(2, 4), torch.ones(2, 4)), teacher_temp=0.04)
    assert diag["aitd/teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    alarm = CollapseAlarm(num_prototypes=K, warmup_iterations=5, patience=3, terms=("aitd",))
    engine = _alarm_engine([diag] * 12)
    alarm.attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(range(12), max_epochs=1)
    assert alarm.alarms == [(6, "aitd", "uniform")]  # first step after warm-up, streak >= 3
    messages = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    assert len(messages) == 1 and "AITD" in messages[0] and "uniform collapse" in messages[0]
    assert "teacher_temp" in messages[0]  # says what to try
    assert alarm.scalars == {"collapse_alarm": 1.0}  # on the handler, for LoggedScalars
    assert "collapse_alarm" not in engine.state.output["scalars"]  # the trainer's output is left alone


def test_no_alarm_below_the_threshold_or_before_patience_and_again_after_recovery(caplog):
    ln_k = math.log(K)
    # 0.96 ln K never alarms; 0.99 ln K for 2 < patience steps does not; then 4 steps alarm, recover, 4 again
    seq = [_scalars(0.96 * ln_k)] * 3 + [_scalars(0.99 * ln_k)] * 2 + [_scalars(0.5)] + [_scalars(0.99 * ln_k)] * 4
    seq += [_scalars(0.5)] + [_scalars(0.99 * ln_k)] * 4
    alarm = CollapseAlarm(num_prototypes=K, warmup_iterations=0, patience=3, terms=("gitd",))
    engine = _alarm_engine(seq)
    alarm.attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(range(len(seq)), max_epochs=1)
    assert alarm.alarms == [(9, "gitd", "uniform"), (14, "gitd", "uniform")]


def test_alarm_fires_its_event_and_a_resumed_alarm_continues_the_episode():
    """The alarms stay on the handler and reach a logger through DiagnosticEvents.COLLAPSE_ALARM; a handler
    restored from state_dict mid-episode does not report the same episode again."""
    from dagman_components.handlers import DiagnosticEvents

    collapsed = [_scalars(0.99 * math.log(K))] * 6
    alarm = CollapseAlarm(num_prototypes=K, warmup_iterations=0, patience=2, terms=("gitd",))
    engine = _alarm_engine(collapsed[:3])
    alarm.attach(engine)
    fired = []
    engine.add_event_handler(DiagnosticEvents.COLLAPSE_ALARM, lambda e: fired.append(list(alarm.alarms)))
    engine.run(range(3), max_epochs=1)
    assert fired == [[(2, "gitd", "uniform")]] and not hasattr(engine.state, "collapse_alarms")
    resumed = CollapseAlarm(num_prototypes=K, warmup_iterations=0, patience=2, terms=("gitd",))
    resumed.load_state_dict(alarm.state_dict())
    later = _alarm_engine(collapsed)
    resumed.attach(later)
    later.run(range(6), max_epochs=1)
    assert resumed.alarms == [(2, "gitd", "uniform")]  # the episode goes on: no second report


def test_feature_collapse_alarm_names_the_term():
    seq = [_scalars(1.0, spread=0.01)] * 4
    alarm = CollapseAlarm(num_prototypes=K, warmup_iterations=0, patience=2, min_spread=0.05, terms=("ampd",))
    engine = _alarm_engine(seq)
    alarm.attach(engine)
    engine.run(range(4), max_epochs=1)
    assert alarm.alarms == [(2, "ampd", "feature")]
    assert "AMPD: feature collapse" in alarm.message("ampd", "feature", seq[0], 2)


def test_one_hot_collapse_is_seen_in_the_batch_entropy(caplog):
    same = torch.zeros(4, K)
    same[:, 3] = 10.0  # every image gets prototype 3: per-image and batch entropy 0
    diverse = torch.zeros(4, K)
    diverse[torch.arange(4), torch.arange(4)] = 10.0  # sharp but different: batch entropy ln 4
    d_same = distillation_diagnostics([(torch.zeros(4, K), same, None)], None, torch.zeros(1, K), 0.04, 0.1)
    d_div = distillation_diagnostics([(torch.zeros(4, K), diverse, None)], None, torch.zeros(1, K), 0.04, 0.1)
    assert d_same["batch_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert d_div["batch_entropy"] == pytest.approx(math.log(4), abs=1e-5) and d_div["teacher_entropy"] < 1e-6
    seq = [{"aitd/teacher_entropy": 0.0, "aitd/spread": 0.5, "aitd/batch_entropy": d["batch_entropy"]}
           for d in (d_div, d_div, d_same, d_same, d_same)]
    alarm = CollapseAlarm(num_prototypes=K, warmup_iterations=0, patience=2, terms=("aitd",))
    engine = _alarm_engine(seq)
    alarm.attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(range(5), max_epochs=1)
    assert alarm.alarms == [(4, "aitd", "one_hot")]
    assert "one-hot collapse" in caplog.text and "higher teacher temperature" in caplog.text


def test_alarm_rejects_bad_settings():
    with pytest.raises(ValueError, match="entropy_ratio"):
        CollapseAlarm(num_prototypes=K, entropy_ratio=1.5)
    with pytest.raises(ValueError, match="unknown term"):
        CollapseAlarm(num_prototypes=K, terms=("amip",))


# ---- one optimizer step: accumulation and bf16


def _networks(seed: int = 0):
    torch.manual_seed(seed)
    enc = SwinDAGMaN(**TINY_ENCODER, sa_stage=2, drop_path_rate=0.0)
    student = DAGMaNPretrainNetwork(enc, out_dim=K, hidden_dim=16, bottleneck_dim=8)
    return student, make_teacher(student)


def _batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(1, 1, 32, 32, 32, generator=g), "image_2": torch.rand(1, 1, 32, 32, 32, generator=g)}
            for _ in range(n)]


def _cat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _train(loader, accumulate_steps: int, student, teacher, amp: bool = False, max_epochs: int = 1,
           freeze_last_layer_iterations: int = 0, lr: float = 0.5, teacher_amp: bool = False):
    """Train with plain SGD (the update is -lr * gradient, so updates compare exactly) and an EMA handler."""
    loss = DAGMaNLoss(out_dim=K)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    total = max_epochs * (len(loader) // accumulate_steps)  # optimizer steps of the run
    momentum = teacher_momentum_schedule(0.9, 1.0, total)
    trainer = CoDistillationTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=student, teacher=teacher,
        optimizer=optimizer, loss_function=loss, masking=AttentionGuidedMasking("attention_high"),
        patch_dropout=PatchDropout(0.0), accumulate_steps=accumulate_steps, amp=amp, amp_dtype="bfloat16",
        teacher_amp=teacher_amp,
        freeze_last_layer_iterations=freeze_last_layer_iterations,
        teacher_temp=teacher_temperature_schedule(0.07, 0.04, warmup_steps=3, total_steps=total),
        teacher_momentum=momentum, train_handlers=[TeacherEMAHandler(teacher, momentum, student=student)], seed=0,
    )
    steps = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(
        (e.state.iteration, e.state.teacher_temp, e.state.teacher_momentum)))
    trainer.run()
    return trainer, loss, steps


def test_accumulated_micro_batches_give_the_update_of_one_big_batch():
    batches = _batches(4)
    s_big, t_big = _networks()
    s_acc, t_acc = copy.deepcopy(s_big), copy.deepcopy(t_big)
    init_student = copy.deepcopy(s_big)
    init_teacher = copy.deepcopy(t_big)
    big, loss_big, steps_big = _train([_cat(batches)], 1, s_big, t_big)
    acc, loss_acc, steps_acc = _train(batches, 4, s_acc, t_acc)
    # one optimizer step each: the schedules and the EMA advanced once
    assert big.state.iteration == acc.state.iteration == 1 and big.state.epoch_length == acc.state.epoch_length == 1
    assert steps_big == steps_acc
    assert steps_acc[0][1] == pytest.approx(0.04)  # first step of the temperature warm-up
    for (name, a), b in zip(s_acc.state_dict().items(), s_big.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    moved = [n for (n, a), b in zip(s_acc.state_dict().items(), init_student.state_dict().values()) if not torch.equal(a, b)]
    assert len(moved) > 50  # the step did change the student
    # the teacher was updated exactly once: t = m*t0 + (1-m)*s1 with m = 0.9 at iteration 0
    for (name, t), t0 in zip(t_acc.named_parameters(), init_teacher.parameters()):
        s1 = dict(s_acc.named_parameters())[name]
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s1, atol=1e-6), name
    # the centres moved once, from the mean over all micro-batches
    for name in ("cls_ce.center", "patch_ce.center", "global_ce.center"):
        assert torch.allclose(loss_acc.state_dict()[name], loss_big.state_dict()[name], atol=1e-6), name
        assert loss_acc.state_dict()[name].abs().sum() > 0
    assert acc.state.output["loss"].item() == pytest.approx(big.state.output["loss"].item(), rel=1e-5)


def test_schedules_and_last_layer_freezing_count_optimizer_steps():
    student, teacher = _networks()
    protos = [p.detach().clone() for h in student.projection_heads() for p in h.last_layer_parameters()]
    trainer, _, steps = _train(_batches(6), 2, student, teacher, max_epochs=2, freeze_last_layer_iterations=3)
    assert trainer.state.epoch_length == 3 and [s[0] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [round(s[1], 4) for s in steps] == [0.04, 0.055, 0.07, 0.07, 0.07, 0.07]  # warm-up over 3 steps
    momenta = [s[2] for s in steps]
    assert momenta[0] == pytest.approx(0.9) and momenta == sorted(momenta)  # cosine over the 6 steps
    after = [p.detach() for h in student.projection_heads() for p in h.last_layer_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, protos))  # learned from step 4 on


def test_last_layer_is_frozen_during_its_iterations():
    student, teacher = _networks()
    protos = [p.detach().clone() for h in student.projection_heads() for p in h.last_layer_parameters()]
    _train(_batches(2), 1, student, teacher, freeze_last_layer_iterations=2)
    after = [p.detach() for h in student.projection_heads() for p in h.last_layer_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, protos))


def test_micro_batches_group_the_loader_and_explain_a_too_short_loader():
    groups = list(MicroBatches(list(range(7)), 3))
    assert groups == [[0, 1, 2], [3, 4, 5]] and len(MicroBatches(list(range(7)), 3)) == 2  # the rest is dropped
    assert optimizer_steps_per_epoch(list(range(7)), 3) == 2
    with pytest.raises(ValueError, match="accumulate_steps=4.*batch_size"):
        optimizer_steps_per_epoch([0, 1], 4)


def test_bf16_step_is_finite_and_close_to_the_fp32_step():
    batches = _batches(1)  # one step from the same weights (a second would start from different weights)
    s32, t32 = _networks()
    s16, t16 = copy.deepcopy(s32), copy.deepcopy(t32)
    init = {k: v.clone() for k, v in s32.state_dict().items()}
    fp32, _, _ = _train(batches, 1, s32, t32, lr=1e-2)
    bf16, _, _ = _train(batches, 1, s16, t16, amp=True, lr=1e-2)
    assert bf16.amp and bf16.amp_dtype == torch.bfloat16 and not fp32.amp
    a, b = fp32.state.output["scalars"], bf16.state.output["scalars"]
    for term in ("loss", "loss_amip", "loss_ampd", "loss_aitd", "loss_gitd", "aitd/teacher_entropy"):
        assert math.isfinite(b[term])
        # bf16 rounds the backbone's activations; at tau_t = 0.04 that moves a sharp target's entropy by a few %
        assert b[term] == pytest.approx(a[term], rel=0.05 if "entropy" in term else 0.02, abs=1e-3), term
    d32 = torch.cat([(v - init[k]).flatten() for k, v in s32.state_dict().items() if v.is_floating_point()])
    d16 = torch.cat([(v - init[k]).flatten() for k, v in s16.state_dict().items() if v.is_floating_point()])
    assert torch.isfinite(d16).all() and d16.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.98  # same direction of the whole update


def test_bf16_teacher_with_fp32_student_is_close_to_fp32():
    batches = _batches(1)
    s32, t32 = _networks()
    s_mix, t_mix = copy.deepcopy(s32), copy.deepcopy(t32)
    fp32, loss32, _ = _train(batches, 1, s32, t32, lr=1e-2)
    mixed, loss_mix, _ = _train(batches, 1, s_mix, t_mix, lr=1e-2, teacher_amp=True)
    assert mixed.teacher_amp and not mixed.amp and not fp32.teacher_amp
    for name in ("cls_ce.center", "patch_ce.center", "global_ce.center"):  # centres stay float32
        assert loss_mix.state_dict()[name].dtype == torch.float32
    a, b = fp32.state.output["scalars"], mixed.state.output["scalars"]
    assert a["loss_amip"] == pytest.approx(b["loss_amip"], rel=1e-5)  # the student's reconstruction is fp32
    assert a["loss"] != b["loss"]  # the teacher did run in bf16
    for term in ("loss", "loss_aitd", "loss_gitd", "loss_ampd"):
        assert math.isfinite(b[term]) and b[term] == pytest.approx(a[term], rel=0.02, abs=1e-3), term


def test_autocast_settings():
    assert autocast_settings(torch.device("cpu"), False) == (False, torch.bfloat16)
    assert autocast_settings(torch.device("cpu"), True, "bfloat16") == (True, torch.bfloat16)
    assert autocast_settings(torch.device("cuda"), True) == (True, torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        autocast_settings(torch.device("cpu"), True, "float16")
    with pytest.raises(ValueError, match="amp_dtype"):
        autocast_settings(torch.device("cpu"), True, "int8")


# ---- KoLeo and the attention-in-mask measure


def test_koleo_on_known_points():
    from dagman_components.losses import koleo_loss

    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # nearest neighbour at sqrt(2)
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    pair = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical: the loss is large
    assert koleo_loss(pair).item() > 15
    assert koleo_loss(square[:1]).item() == 0.0
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    z.requires_grad_(True)
    koleo_loss(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_koleo_weight_enters_the_total_only_when_set():
    student, teacher = _networks()
    x = torch.rand(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    s, t = student(x), teacher(x)
    su, sv = ({k: v[:2] if torch.is_tensor(v) and v.ndim and k != "sa_grid" else v for k, v in s.items()},
              {k: v[2:] if torch.is_tensor(v) and v.ndim and k != "sa_grid" else v for k, v in s.items()})
    tu, tv = ({k: v[:2] if torch.is_tensor(v) and v.ndim and k != "sa_grid" else v for k, v in t.items()},
              {k: v[2:] if torch.is_tensor(v) and v.ndim and k != "sa_grid" else v for k, v in t.items()})
    n = su["patch_logits"].shape[1]
    masks = (torch.ones(2, n), torch.ones(2, n))
    vox = (torch.ones(2, 32, 32, 32), torch.ones(2, 32, 32, 32))
    args = dict(student=(su, sv), teacher=(tu, tv), cell_masks=masks, voxel_masks=vox, images=(x[:2], x[2:]),
                teacher_temp=0.04)
    total0, parts = DAGMaNLoss(K)(**args)
    total1, _ = DAGMaNLoss(K, weights={"koleo": 0.5})(**args)
    assert parts["koleo"] != 0
    assert total1.item() == pytest.approx(total0.item() + 0.5 * parts["koleo"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss weight"):
        DAGMaNLoss(K, weights={"kolo": 1.0})


def test_attention_mass_in_mask():
    from dagman_components.metrics.attention_in_mask import attention_mass_in_mask

    masks = torch.zeros(2, 1, 4, 4, 4)
    masks[:, :, :2, :2, :2] = 1  # the first of 8 cells of 2^3 voxels
    uniform = torch.full((2, 8), 1 / 8)
    peaked = torch.zeros(2, 8)
    peaked[:, 0] = 1.0
    inside, share = attention_mass_in_mask(uniform, (2, 2, 2), 2, masks)
    assert inside.tolist() == pytest.approx([0.125, 0.125]) and share.tolist() == pytest.approx([0.125, 0.125])
    inside, _ = attention_mass_in_mask(peaked, (2, 2, 2), 2, masks)
    assert inside.tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="do not match"):
        attention_mass_in_mask(uniform, (2, 2, 2), 4, masks)


def test_attention_in_mask_report_on_shipped_crops_is_near_chance_for_a_random_encoder():
    from conftest import DATA

    from dagman_components.classification import read_nodule_table
    from dagman_components.metrics.attention_in_mask import attention_in_mask_report

    folder = DATA / "lidc_nodules_sample"
    items = read_nodule_table(folder / "nodules.csv", image_dir=folder / "image")[:6]
    items = [{**it, "mask": str(folder / "mask" / Path(it["image"]).name)} for it in items]
    torch.manual_seed(0)
    rep = attention_in_mask_report(SwinDAGMaN(**TINY_ENCODER, sa_stage=2), items)
    assert 1 <= rep["cases"] <= 6 and len(rep["mass_inside"]) == rep["cases"]
    assert all(0.0 <= m <= 1.0 for m in rep["mass_inside"]) and all(0.0 < s < 1.0 for s in rep["mask_share"])
    assert 0.8 < rep["mean_ratio"] < 1.25  # an untrained [CLS] spreads its attention: about chance


def test_logged_scalars_merges_the_sources_without_changing_the_output():
    """LoggedScalars is what TensorBoard, MLflow and the curves log: the trainer's scalars, then each source's
    (a later source wins a shared name); a source without ``scalars`` is refused at construction."""
    from types import SimpleNamespace

    from dagman_components.handlers import LoggedScalars

    first, second = SimpleNamespace(scalars={"a": 1.0, "b": 2.0}), SimpleNamespace(scalars={"b": 3.0})
    output = {"loss": torch.tensor(0.5), "scalars": {"loss": 0.5, "a": 0.0}}
    assert LoggedScalars([first, second])(output) == {"loss": 0.5, "a": 1.0, "b": 3.0}
    assert output["scalars"] == {"loss": 0.5, "a": 0.0}
    assert LoggedScalars()(None) == {} and LoggedScalars([first])([1, 2]) == {"a": 1.0, "b": 2.0}
    with pytest.raises(TypeError, match="Engine has none"):
        LoggedScalars([Engine(lambda e, b: None)])
