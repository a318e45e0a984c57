# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Names of the encoder outputs: the keys of the dict that :class:`SwinDAGMaN` and :class:`ViTDAGMaN` return."""

from __future__ import annotations

from monai.utils import StrEnum

__all__ = ["EncoderOutput"]


class EncoderOutput(StrEnum):
    """Keys of an encoder's output dict (a ``str``: ``out[EncoderOutput.CLS] is out["cls"]``).

    ``CLS``: [CLS] token of the semantic-attention block, (B, C_sa). ``PATCH_TOKENS``: its patch
    tokens, (B, N, C_sa). ``S_ATT``: [CLS]-to-patch attention, (B, N). ``SA_GRID``: the SA grid's
    shape, (3,). ``GLOBAL``: average-pooled last stage, (B, C_out). ``FEATURES``: list of hidden states.
    """

    CLS = "cls"
    PATCH_TOKENS = "patch_tokens"
    S_ATT = "s_att"
    SA_GRID = "sa_grid"
    GLOBAL = "global"
    FEATURES = "features"
