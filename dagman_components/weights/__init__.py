"""Weights: reading and writing state dicts and model cards, and the one way to build and load an encoder.

- :mod:`~dagman_components.weights.state_dict`: ``torch.load(weights_only=True)``, the key layout of a
  released ``model.pt``, :func:`~dagman_components.weights.state_dict.load_pretrained_encoder` (the 100 %
  rule) and :func:`~dagman_components.weights.state_dict.export_encoder`;
- :mod:`~dagman_components.weights.encoder_io`: the model card, the settings it fixes, the preprocessing it
  implies, and building, loading and freezing an encoder for a downstream bundle.
"""

from dagman_components.weights import encoder_io, state_dict

__all__ = ["encoder_io", "state_dict"]
