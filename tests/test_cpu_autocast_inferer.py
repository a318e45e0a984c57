"""bf16 sliding-window inference on CPU, and the window count the segmentation benchmark reports."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import imported_script
from monai.inferers import SlidingWindowInferer

from dagman_components.segmentation import CPUAutocastInferer


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.windows, self.dtypes = 0, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        out = self.conv(x)
        self.dtypes.add(out.dtype)
        return out


def test_bf16_under_autocast_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    net = Recorder()
    image = torch.rand(1, 1, 40, 36, 20)
    inner = SlidingWindowInferer(roi_size=(32, 32, 16), sw_batch_size=4, overlap=0.5)
    plain = CPUAutocastInferer(inner, enabled=False)(image, net)
    assert net.dtypes == {torch.float32}
    net.dtypes.clear()
    bf16 = CPUAutocastInferer(inner, enabled=True)(image, net)
    assert net.dtypes == {torch.bfloat16} and bf16.dtype == torch.float32
    assert torch.allclose(bf16, plain, atol=0.02, rtol=0.02) and not torch.equal(bf16, plain)


def test_auto_follows_the_cpu_and_bad_values_are_refused():
    image = torch.rand(1, 1, 8, 8, 8)
    with mock.patch("dagman_components.segmentation.inferers.cpu_has_native_bf16", return_value=False):
        assert not CPUAutocastInferer(SlidingWindowInferer((8, 8, 8))).active_for(image)
    with mock.patch("dagman_components.segmentation.inferers.cpu_has_native_bf16", return_value=True):
        assert CPUAutocastInferer(SlidingWindowInferer((8, 8, 8))).active_for(image)
    assert CPUAutocastInferer(SlidingWindowInferer((8, 8, 8)), enabled="False").enabled is False
    with pytest.raises(ValueError, match="cpu_bf16"):
        CPUAutocastInferer(SlidingWindowInferer((8, 8, 8)), enabled="yes")


@pytest.mark.parametrize("shape, roi, overlap", [((40, 36, 20), (32, 32, 16), 0.5), ((64, 64, 32), (64, 64, 32), 0.5),
                                                 ((20, 70, 33), (32, 32, 16), 0.25)])
def test_window_count_matches_monai(shape, roi, overlap):
    net = Recorder()
    SlidingWindowInferer(roi_size=roi, sw_batch_size=3, overlap=overlap)(torch.rand(1, 1, *shape), net)
    with imported_script("benchmark_segmentation_inference") as module:
        assert module.number_of_windows(shape, roi, overlap) == net.windows
