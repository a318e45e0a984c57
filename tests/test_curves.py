"""The one curve writer: epoch curves of the downstream bundles, per-iteration curves of pretraining."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

from dagman_components.handlers import CurveHistory, EpochCurveWriter, LossHistoryPlotter


def _trainer_and_evaluator(losses: list[float], metrics: dict[int, float]) -> tuple[Engine, Engine]:
    """A trainer whose output is ``[{"loss": ...}]`` (two iterations per epoch) and an evaluator that
    reports ``metrics[epoch]`` when run on that epoch."""
    values = iter(losses)
    trainer = Engine(lambda e, b: [{"loss": torch.tensor(next(values))}])
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.COMPLETED)
    def _metric(engine: Engine) -> None:
        engine.state.metrics = {"val_dice": metrics[trainer.state.epoch]}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine: Engine) -> None:
        if engine.state.epoch in metrics:
            evaluator.run([0])

    return trainer, evaluator


def test_epoch_curve_writer_writes_mean_loss_and_validations(tmp_path):
    trainer, evaluator = _trainer_and_evaluator([1.0, 3.0, 2.0, 2.0, 0.5, 1.5], {1: 0.25, 3: 0.5})
    history = CurveHistory()
    EpochCurveWriter(tmp_path / "curves.png", evaluator, metric_name="val_dice", history=history).attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows == ["epoch,train_loss,val_dice", "1,2,0.25", "2,2,", "3,1,0.5"]
    # the history travels in a checkpoint: a resumed writer continues it
    resumed = EpochCurveWriter(tmp_path / "again.png", metric_name="val_dice")
    resumed.load_state_dict(torch.load(_saved(tmp_path, history.state_dict()), weights_only=True))
    resumed.write()
    assert (tmp_path / "again.csv").read_text().splitlines() == rows


def _saved(tmp_path, state: dict):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_epoch_curve_writer_names_the_metric_before_any_validation(tmp_path):
    trainer, _ = _trainer_and_evaluator([1.0, 1.0], {})
    EpochCurveWriter(tmp_path / "c.png", metric_name="val_auc").attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    assert (tmp_path / "c.csv").read_text().splitlines() == ["epoch,train_loss,val_auc", "1,1,"]


def test_loss_history_plotter_nan_fills_a_series_its_checkpoint_lacks(tmp_path):
    plotter = LossHistoryPlotter(tmp_path / "loss.png", keys=["loss", "loss_amip"])
    plotter.load_state_dict({"x_name": "iteration", "series": {"loss": ([1, 2], [2.0, 1.5])}})  # no loss_amip then
    plotter.write()
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows == ["iteration,loss,loss_amip", "1,2,nan", "2,1.5,nan"]
    state = plotter.state_dict()
    assert state["series"]["loss"] == ([1, 2], [2.0, 1.5]) and all(math.isnan(v) for v in state["series"]["loss_amip"][1])


def test_epoch_curve_writer_reads_the_loss_of_a_dict_output(tmp_path):
    trainer = Engine(lambda e, b: {"loss": torch.tensor(0.5)})  # SupervisedTrainer without decollation
    EpochCurveWriter(tmp_path / "c.png", metric_name="val_auc").attach(trainer)
    trainer.run([0], max_epochs=1)
    assert (tmp_path / "c.csv").read_text().splitlines()[1] == "1,0.5,"
