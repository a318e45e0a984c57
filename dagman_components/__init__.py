"""DAGMaN components for MONAI bundles: networks, masking, losses, engines, handlers, data, weights.

Importing the package imports its sub-packages, so a bundle config needs only
``$import dagman_components`` to reference e.g. ``dagman_components.networks.SwinDAGMaN``.
"""

from __future__ import annotations

from dagman_components import (
    classification,
    clustering,
    config_checks,
    data,
    encoder_io,
    engines,
    errors,
    handlers,
    losses,
    masking,
    metrics,
    networks,
    optim,
    schedules,
    segmentation,
    visualize,
    weights,
)

__version__ = "0.1.0"
