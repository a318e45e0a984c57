"""Schedules (lr, teacher temperature, EMA momentum) and the EMA arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dagman_components.handlers import ema_update
from dagman_components.schedules import (
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


def test_precomputed_schedules_equal_the_per_step_rules():
    """The arrays hold what LambdaLR with WarmupCosineFactor, ema_momentum and the temperature warm-up
    gave per step, bit for bit (pretraining numbers unchanged), indexed by the 1-based optimizer step."""
    factor = WarmupCosineFactor(total_iterations=12, warmup_iterations=3, min_factor=1e-3)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=8e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lr = warmup_cosine_schedule(8e-4, 12, 3, 1e-3)
    for iteration in range(1, 13):  # LambdaLR stepped after each iteration
        assert value_at(lr, iteration) == opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    momentum = teacher_momentum_schedule(0.996, 1.0, 12)
    assert [value_at(momentum, i) for i in range(1, 13)] == [ema_momentum(i - 1, 12) for i in range(1, 13)]
    assert value_at(momentum, 99) == momentum[-1]
    with pytest.raises(ValueError, match="base_momentum"):
        teacher_momentum_schedule(0.9, 0.8, 12)
    with pytest.raises(ValueError, match="empty"):
        value_at([], 1)
