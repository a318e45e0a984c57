"""DAGMaN components for MONAI bundles: networks, masking, losses, engines, handlers, data, weights.

Importing the package imports its sub-packages, so a bundle config needs only
``$import dagman_components`` to reference e.g. ``dagman_components.networks.SwinDAGMaN``.
"""

from __future__ import annotations

from dagman_components import (
    bundle_tools,
    classification,
    clustering,
    data,
    engines,
    errors,
    features,
    handlers,
    losses,
    masking,
    metrics,
    networks,
    optim,
    runtime,
    segmentation,
    visualize,
    weights,
)

__version__ = "0.1.0"
