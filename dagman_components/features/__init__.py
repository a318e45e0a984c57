"""Features of a frozen encoder: the batched loop over many images, and extraction from a folder of CT.

- :mod:`~dagman_components.features.frozen_features`: the one loop that runs a frozen encoder over images;
- :mod:`~dagman_components.features.extraction`: the pretraining bundle's ``inference`` config (features
  and S_ATT maps of a CT folder).
"""

from dagman_components.features import extraction, frozen_features

__all__ = ["extraction", "frozen_features"]
