"""The project's AdamW: fused kernel where possible, the same update as the foreach kernel, a one-line fallback."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from dagman_components.optim import optimizers
from dagman_components.optim.optimizers import adamw
from dagman_components.optim.param_groups import param_groups_weight_decay


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _train(fused: bool, steps: int = 4) -> tuple[nn.Module, torch.optim.AdamW]:
    network = _network()
    optimizer = adamw(param_groups_weight_decay(network, 0.1), lr=1e-2, fused=fused)
    inputs = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    for step in range(steps):
        optimizer.param_groups[0]["weight_decay"] = 0.1 * (step + 1)  # a schedule changes the decay each step
        optimizer.zero_grad(set_to_none=True)
        network(inputs).square().mean().backward()
        optimizer.step()
    return network, optimizer


def test_fused_kernel_on_cpu_and_foreach_when_off() -> None:
    assert adamw(_network().parameters(), lr=1e-3).defaults["fused"] is True
    off = adamw(_network().parameters(), lr=1e-3, fused=False).defaults
    assert not off["fused"] and off["foreach"] is True


def test_fused_and_foreach_updates_agree_and_state_dicts_interchange() -> None:
    fused_net, fused_opt = _train(fused=True)
    foreach_net, foreach_opt = _train(fused=False)
    initial = _network()
    for (name, a), b, start in zip(fused_net.named_parameters(), foreach_net.parameters(), initial.parameters()):
        assert not torch.equal(a, start), name  # the steps moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # a checkpoint of one kernel resumes with the other: same state keys and shapes
    fused_state, foreach_state = fused_opt.state_dict(), foreach_opt.state_dict()
    assert fused_state["state"].keys() == foreach_state["state"].keys()
    for key, state in fused_state["state"].items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in foreach_state["state"][key].items()}
    foreach_opt.load_state_dict(fused_state)
    assert foreach_opt.state_dict()["state"][0]["step"] == 4


def test_device_without_fused_kernel_falls_back_with_one_line(monkeypatch, caplog) -> None:
    monkeypatch.setattr(optimizers, "fused_kernel_devices", lambda: frozenset({"cuda"}))
    with caplog.at_level(logging.WARNING, logger=optimizers.__name__):
        optimizer = adamw(param_groups_weight_decay(_network()), lr=1e-3)
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is True
    assert len(caplog.records) == 1 and "cpu torch.float32" in caplog.records[0].getMessage()

