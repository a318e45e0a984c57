"""Ignite/MONAI handlers of the DAGMaN engines."""

from dagman_components.handlers.collapse import CollapseAlarm
from dagman_components.handlers.lock import TrainingLock, TrainingLockedError
from dagman_components.handlers.checkpoint import (
    AtomicCheckpointSaver,
    BestMetricSaver,
    CheckpointSettingsError,
    EncoderExporter,
    ResumeFromCheckpoint,
    TrainedModelCard,
    WeightsOnlyCheckpointLoader,
)
from dagman_components.handlers.events import (
    DiagnosticEvents,
    DiagnosticSource,
    LoggedScalars,
    register_diagnostic_events,
)
from dagman_components.handlers.curves import CurveHistory, CurveWriter, EpochCurveWriter
from dagman_components.handlers.monitoring import (
    DataWaitTimer,
    LossHistoryPlotter,
    LossProgressBar,
    draw_loss_history,
)
from dagman_components.handlers.optimizer_schedule import OptimizerSchedule
from dagman_components.handlers.teacher_ema import TeacherEMAHandler, ema_update
from dagman_components.handlers.probe import FrozenFeatureProbe
from dagman_components.handlers.tracking import configure_tracking, tracked_scalars
