"""Schedules (lr, teacher temperature, EMA momentum) and the EMA arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dagman_components.handlers import ema_update
from dagman_components.optim.schedules import (
    WarmupCosineFactor,
    cosine_schedule,
    ema_momentum,
    teacher_momentum_schedule,
    teacher_temperature_schedule,
    value_at,
    warmup_cosine_schedule,
)


def test_cosine_schedule_endpoints():
    s = cosine_schedule(1.0, 0.0, total_steps=11, warmup_steps=0)
    assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.0) and s[5] == pytest.approx(0.5)
    w = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    assert w[:4].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75]) and w[4] == pytest.approx(1.0)
    assert w[-1] == pytest.approx(0.1)


def test_teacher_temperature_warmup():
    t = teacher_temperature_schedule(0.07, 0.04, warmup_steps=30, total_steps=800)
    assert len(t) == 800 and t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07) and t[-1] == 0.07
    assert np.all(np.diff(t[:30]) > 0)


def test_warmup_cosine_factor():
    f = WarmupCosineFactor(total_iterations=10, warmup_iterations=2, min_factor=0.0)
    assert [f(0), f(1)] == pytest.approx([0.5, 1.0])
    assert f(2) == pytest.approx(1.0) and f(9) == pytest.approx(0.0)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=8e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    assert "lr_lambdas" in sched.state_dict() and sched.state_dict()["lr_lambdas"][0]["total_iterations"] == 10


def test_ema_momentum_cosine_over_global_iterations():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ema_momentum(0, 0)


def test_ema_update_arithmetic():
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(0.0)
        student.weight.fill_(3.0), student.bias.fill_(2.0)
    assert ema_update(teacher, student, 0.75) == 2
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1.5))  # 0.75*1 + 0.25*3
    assert torch.allclose(teacher.bias, torch.tensor([0.5]))
    with pytest.raises(KeyError, match="no student counterpart"):
        ema_update(nn.Linear(2, 2), nn.Sequential(), 0.9)


def test_optimizer_schedule_sets_lr_and_decay_per_optimizer_step_and_spares_undecayed_groups():
    from ignite.engine import Engine

    from dagman_components.handlers import OptimizerSchedule

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [net.weight], "weight_decay": 0.04},
                             {"params": [net.bias], "weight_decay": 0.0, "lr": 2e-3}], lr=1e-3)
    seen = []
    engine = Engine(lambda e, b: seen.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups]))
    lr = warmup_cosine_schedule(1e-3, total_steps=5, warmup_steps=2, min_factor=0.0)
    OptimizerSchedule(opt, lr=lr, weight_decay=cosine_schedule(0.04, 0.4, total_steps=5)).attach(engine)
    engine.run([0] * 5, max_epochs=1)
    decayed = [round(step[0][1], 6) for step in seen]
    assert decayed[0] == 0.04 and decayed[-1] == 0.4 and decayed == sorted(decayed)
    assert decayed[2] == pytest.approx(0.22)  # the cosine's midpoint
    assert all(step[1][1] == 0.0 for step in seen)
    assert [step[0][0] for step in seen] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0.0])  # warm-up, cosine
    assert all(step[1][0] == pytest.approx(2 * step[0][0]) for step in seen)  # the bias group keeps its ratio
    with pytest.raises(ValueError, match="weight decay"):
        OptimizerSchedule(opt, weight_decay=[-0.1, 0.4])


def _student_at_step(student: nn.Module):
    """An Ignite process function standing in for the optimizer: at 1-based step i the student's weight is i."""

    def step(engine, batch):
        with torch.no_grad():
            student.weight.fill_(float(engine.state.iteration))

    return step


def test_ema_teacher_after_k_steps_of_a_known_schedule_and_after_a_resume():
    """TeacherEMAHandler on an Ignite engine: 3 steps of the cosine momentum schedule 0 -> 1 over 3 steps,
    whose values are 0, 1/4, 3/4 (DINO's cosine at k/K = 0, 1/3, 2/3), with a student whose weight is i at
    step i. By hand: t1 = 0 * 0 + 1 * 1 = 1; t2 = 1/4 * 1 + 3/4 * 2 = 1.75; t3 = 3/4 * 1.75 + 1/4 * 3 = 2.0625.
    A run resumed after step 2 (teacher 1.75, engine at iteration 2) takes step 3's momentum and ends the same."""
    from ignite.engine import Engine, Events

    from dagman_components.handlers import TeacherEMAHandler

    momentum = teacher_momentum_schedule(0.0, 1.0, 3)
    assert momentum.tolist() == pytest.approx([0.0, 0.25, 0.75], abs=1e-7)
    seen = []
    student, teacher = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        teacher.weight.zero_()
    engine = Engine(_student_at_step(student))
    TeacherEMAHandler(teacher, momentum, student=student).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(teacher.weight.item()))
    engine.run([0] * 3, max_epochs=1)
    assert seen == pytest.approx([1.0, 1.75, 2.0625], abs=1e-6)

    resumed_student, resumed_teacher = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        resumed_teacher.weight.fill_(1.75)
    resumed = Engine(_student_at_step(resumed_student))
    TeacherEMAHandler(resumed_teacher, momentum, student=resumed_student).attach(resumed)
    resumed.load_state_dict({"iteration": 2, "epoch_length": 3, "max_epochs": 1})
    resumed.run([0] * 3)
    assert resumed.state.iteration == 3
    assert resumed_teacher.weight.item() == pytest.approx(2.0625, abs=1e-6)


def test_warmup_cosine_lr_per_step_by_hand():
    """lr per 1-based optimizer step: warm-up (step + 1) / warmup, then cosine from 1 to min_factor over the
    remaining steps; base 8e-4, 3 warm-up steps of 7, min_factor 0: 1/3, 2/3, 1, then 1, 0.75, 0.25, 0."""
    lr = warmup_cosine_schedule(8e-4, 7, 3, 0.0)
    cosine = [0.5 * (1 + np.cos(np.pi * t / 3)) for t in range(4)]  # 1, 0.75, 0.25, 0
    expected = [8e-4 / 3, 8e-4 * 2 / 3, 8e-4] + [8e-4 * c for c in cosine]
    assert [value_at(lr, i) for i in range(1, 8)] == pytest.approx(expected, abs=1e-12)
    assert value_at(lr, 99) == pytest.approx(0.0, abs=1e-12)  # past the end: the last value


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="base_momentum"):
        teacher_momentum_schedule(0.9, 0.8, 12)
    with pytest.raises(ValueError, match="empty"):
        value_at([], 1)
