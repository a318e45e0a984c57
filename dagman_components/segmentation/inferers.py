"""Mixed-precision inference on CPUs with native bf16, which MONAI's evaluators do not offer (their
``amp`` option is CUDA autocast)."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from dagman_components.engines import cpu_has_native_bf16

__all__ = ["CPUAutocastInferer"]


class CPUAutocastInferer(Inferer):
    """Run another inferer under bf16 autocast when the input is on a CPU that computes bf16 natively
    (AVX512-BF16 / AMX), and return float32; elsewhere it is the inner inferer unchanged (on CUDA,
    use the evaluator's ``amp``).

    Args:
        inferer: the inferer to wrap (for example MONAI's ``SlidingWindowInferer``).
        enabled: ``"auto"`` (on where the CPU has native bf16), ``True`` (on for any CPU input) or ``False``.

    Raises:
        ValueError: for another value of ``enabled``.
    """

    def __init__(self, inferer: Inferer, enabled: bool | str = "auto") -> None:
        spelled = {"true": True, "false": False, "auto": "auto"}
        if isinstance(enabled, str) and enabled.lower() in spelled:  # as the command line passes it
            enabled = spelled[enabled.lower()]
        if enabled not in (True, False, "auto"):
            raise ValueError(f"cpu_bf16 must be true, false or auto, got {enabled!r}.")
        self.inferer = inferer
        self.enabled = enabled

    def active_for(self, inputs: torch.Tensor) -> bool:
        """Whether ``inputs`` would be inferred in bf16."""
        if inputs.device.type != "cpu" or self.enabled is False:
            return False
        return self.enabled is True or cpu_has_native_bf16()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active_for(inputs):
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out
