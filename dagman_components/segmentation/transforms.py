# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Post-processing of predicted label maps: keep the largest connected component, fill holes.

Both use ``scipy.ndimage`` (MONAI's ``KeepLargestConnectedComponent`` needs scikit-image on CPU,
which this project does not install; MONAI's ``FillHoles`` already uses scipy).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import FillHoles, MapTransform, Transform
from monai.utils import convert_to_numpy, ensure_tuple
from scipy import ndimage

__all__ = ["keep_largest_component", "SegmentationPostprocessd", "HideKeyPrefixedItemsd", "RestoreHiddenItemsd"]

#: Where :class:`HideKeyPrefixedItemsd` keeps the entries it hides.
HIDDEN_KEY = "_hidden_items"


def keep_largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """The largest connected component of a boolean mask (all spatial dimensions).

    Args:
        mask: boolean array, spatial dimensions only.
        connectivity: 1 (faces) up to ``mask.ndim`` (faces, edges and corners); ``None``: ``mask.ndim``.

    Returns:
        A boolean array of the same shape; all False when ``mask`` is empty.

    Example:
        >>> keep_largest_component(np.array([1, 1, 0, 1], bool)).tolist()
        [True, True, False, False]
    """
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity or mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


class SegmentationPostprocessd(MapTransform):
    """Optional clean-up of discrete predictions, each step switched by one flag.

    ``largest_component`` keeps, for each class in ``applied_labels``, only its largest connected
    component; ``fill_holes`` then fills background regions fully enclosed by a class (MONAI
    ``FillHoles``). Both work on a label map with one channel (``(1, H, W, D)`` of class indices;
    removed voxels become 0) or on one-hot channels (``(C, H, W, D)``; ``applied_labels`` are then
    channel indices; removed voxels move to channel 0 and filled voxels leave it). With both flags off the data pass
    through unchanged, so a config names the flags once and keeps this transform in its list.

    Args:
        keys: keys of the discrete predictions.
        largest_component: keep the largest connected component per class.
        fill_holes: fill enclosed holes per class.
        applied_labels: class indices (or one-hot channels) to process; default every class but 0.
        connectivity: neighbourhood of a component (1: faces ... 3: faces, edges and corners in 3D);
            ``None`` uses the full neighbourhood.
        allow_missing_keys: do not raise when a key is missing.

    Example:
        >>> post = SegmentationPostprocessd("pred", largest_component=True, fill_holes=True)
        >>> out = post({"pred": torch.zeros(1, 8, 8, 8)})
    """

    def __init__(
        self,
        keys: KeysCollection,
        largest_component: bool = False,
        fill_holes: bool = False,
        applied_labels: Sequence[int] | int | None = None,
        connectivity: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.largest_component = bool(largest_component)
        self.fill_holes = bool(fill_holes)
        self.applied_labels = None if applied_labels is None else [int(x) for x in ensure_tuple(applied_labels)]
        self.connectivity = connectivity
        self._fill = FillHoles(applied_labels=self.applied_labels, connectivity=connectivity)

    def _largest(self, img: Any) -> Any:
        array = convert_to_numpy(img.as_tensor() if isinstance(img, MetaTensor) else img)
        out = array.copy()
        if array.shape[0] > 1:  # one-hot channels
            for c in self.applied_labels or range(1, array.shape[0]):
                mask = array[c] > 0
                keep = keep_largest_component(mask, self.connectivity)
                out[c] = keep.astype(array.dtype)
                out[0][mask & ~keep] = 1
        else:
            labels = self.applied_labels or [int(v) for v in np.unique(array) if v != 0]
            for value in labels:
                mask = array[0] == value
                out[0][mask & ~keep_largest_component(mask, self.connectivity)] = 0
        if isinstance(img, torch.Tensor):  # keep the type, device and metadata (incl. applied operations)
            result = img.clone()
            result[...] = torch.as_tensor(out, dtype=img.dtype, device=img.device)
            return result
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.largest_component:
                d[key] = self._largest(d[key])
            if self.fill_holes:
                d[key] = self._fill(d[key])
                if d[key].shape[0] > 1:  # one-hot: the filled voxels leave the background channel
                    d[key][0] = 1 - (d[key][1:] > 0).any(0).to(d[key].dtype) if isinstance(d[key], torch.Tensor) \
                        else 1 - (d[key][1:] > 0).any(0).astype(d[key].dtype)
        return d


class HideKeyPrefixedItemsd(MapTransform):
    """Move entries such as ``image_path`` (a string) out of the way of MONAI's ``Spacingd``.

    MONAI 1.6.1's ``Spacingd`` treats every entry whose key starts with ``"<key>_"`` as a metadata
    dict of ``<key>`` and calls ``.update`` on it, which fails for a string (MONAI Label adds
    ``image_path`` to every request; user datalists may hold ``image_id``). This transform moves
    such entries (not dicts) into ``data["_hidden_items"]``; :class:`RestoreHiddenItemsd` puts them back.

    Args:
        keys: the image / label keys whose ``"<key>_*"`` entries are hidden.
        allow_missing_keys: unused (kept for the MapTransform signature).

    Example:
        >>> HideKeyPrefixedItemsd("image")({"image": 0, "image_path": "a.nii"})
        {'image': 0, '_hidden_items': {'image_path': 'a.nii'}}
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{k}_" for k in self.keys)
        hidden = {k: d.pop(k) for k in list(d) if isinstance(k, str) and k.startswith(prefixes)
                  and not isinstance(d[k], Mapping)}
        if hidden:
            d[HIDDEN_KEY] = {**d.get(HIDDEN_KEY, {}), **hidden}
        return d


class RestoreHiddenItemsd(Transform):
    """Put back the entries hidden by :class:`HideKeyPrefixedItemsd` (no-op when none were hidden)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.update(d.pop(HIDDEN_KEY, None) or {})
        return d
