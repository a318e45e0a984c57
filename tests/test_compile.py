"""compile_network: keys unchanged, a logged eager fallback, and a compiled DAGMaN step equal to the eager one."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from ignite.engine import Events

from dagman_components.runtime.compilation import CompiledForward, compile_network
from dagman_components.engines import CoDistillationTrainer
from dagman_components.losses import DAGMaNLoss
from dagman_components.masking import AttentionGuidedMasking, PatchDropout
from dagman_components.networks import DAGMaNPretrainNetwork, SwinDAGMaN, make_teacher

K = 16
#: The smallest encoder a DAGMaN step runs on (two stages, the SA block after the second): inductor's
#: C++ compilation of a step takes minutes on 2 cores with a cold cache, less for fewer kernels.
SMALLEST_ENCODER = {"embed_dim": 12, "depths": (1, 1), "num_heads": (3, 3), "sa_stage": 2, "sa_depth": 1,
                    "sa_heads": 4, "drop_path_rate": 0.0}


def _student(seed: int = 0) -> DAGMaNPretrainNetwork:
    torch.manual_seed(seed)
    return DAGMaNPretrainNetwork(SwinDAGMaN(**SMALLEST_ENCODER), out_dim=K, hidden_dim=16, bottleneck_dim=8)


def test_compile_network_keeps_the_module_its_keys_and_gives_copies_their_own_forward():
    plain = _student()
    net = compile_network(copy.deepcopy(plain))
    assert isinstance(net.__dict__["forward"], CompiledForward)  # nothing is compiled before the first call
    assert list(net.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in net.state_dict())
    teacher = make_teacher(net)  # a deep copy: its forward is bound to the copy, not to the student
    assert teacher.__dict__["forward"].module is teacher
    assert compile_network(plain, enabled=False) is plain and "forward" not in plain.__dict__


def test_a_failing_compilation_logs_one_line_and_runs_eagerly(caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU())
    net = compile_network(copy.deepcopy(eager), backend=broken_backend)
    x = torch.rand(2, 4)
    with caplog.at_level(logging.WARNING, logger="dagman_components.runtime.compilation"):
        first, second = net(x), net(x)
    records = [r for r in caplog.records if r.name == "dagman_components.runtime.compilation"]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert "torch.compile of Sequential failed, running eagerly" in records[0].getMessage()
    assert "no C++ compiler" in records[0].getMessage()
    torch.testing.assert_close(first, eager(x), rtol=0, atol=0)
    torch.testing.assert_close(second, eager(x), rtol=0, atol=0)


def _trainer(student, max_epochs: int, compile: bool) -> CoDistillationTrainer:
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(2, 1, 32, 32, 32, generator=g), "image_2": torch.rand(2, 1, 32, 32, 32, generator=g)}
    return CoDistillationTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=[batch], network=student, teacher=make_teacher(student),
        optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3), loss_function=DAGMaNLoss(out_dim=K),
        masking=AttentionGuidedMasking(), patch_dropout=PatchDropout(0.5), diagnostics=False, seed=0,
        compile=compile,
    )


def _losses(trainer: CoDistillationTrainer) -> list[float]:
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step_and_resumes_exactly():
    eager = _trainer(_student(), 2, compile=False)
    compiled = _trainer(_student(), 2, compile=True)
    snapshot: dict = {}  # what a checkpoint after the first step holds

    @compiled.on(Events.ITERATION_COMPLETED(once=1))
    def _save(engine):
        snapshot.update({name: copy.deepcopy(getattr(engine, name).state_dict())
                         for name in ("network", "teacher", "optimizer", "loss_function")}, trainer=engine.state_dict())

    eager_losses, compiled_losses = _losses(eager), _losses(compiled)
    if compiled.network.forward.failed:
        pytest.skip(f"inductor cannot compile on this machine: {compiled.network.forward.failed}")
    assert compiled.network.forward.failed is None and compiled.teacher.forward.failed is None
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert list(compiled.network.state_dict()) == list(eager.network.state_dict())  # no _orig_mod. prefixes

    # resume: the first step's state in fresh objects, then the second step, compiled again
    resumed = _trainer(_student(seed=5), 2, compile=True)
    for name in ("network", "teacher", "optimizer", "loss_function"):
        getattr(resumed, name).load_state_dict(snapshot[name])
    resumed.load_state_dict(snapshot["trainer"])
    assert _losses(resumed) == compiled_losses[1:]  # bit-exact on the same machine
    for key, value in compiled.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key
