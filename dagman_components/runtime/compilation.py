"""``torch.compile`` for a network in place, keeping its state-dict keys, with a one-line fallback.

``torch.compile(module)`` returns a wrapper whose state dict prefixes every key with ``_orig_mod.``;
checkpoints and exported weights would no longer load into an uncompiled network. :func:`compile_network`
compiles the module's ``forward`` instead and sets it on the module itself: the module, its
parameters, state dict, hooks and optimizer references stay as they were. When compilation fails
(no C++ compiler for inductor on CPU, an unsupported operation, ...), one warning line names the
error and the module runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CompiledForward", "compile_network", "deterministic_lowering"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A MONAI ``MetaTensor`` as a plain tensor (dynamo would trace its metadata); anything else as it is."""
    return value.as_tensor() if isinstance(value, torch.Tensor) and hasattr(value, "as_tensor") else value


@contextmanager
def deterministic_lowering() -> Iterator[None]:
    """Make inductor generate run-to-run deterministic code for what is compiled inside the block.

    On CPU, inductor accumulates scatters (the backward of an index, e.g. of the relative position
    bias table) with atomic adds whose order varies between runs, so a resumed run would drift from
    the uninterrupted one in the last bits. With PyTorch's deterministic algorithms on, inductor
    uses the deterministic ATen kernel instead; the backward is lowered together with the forward
    so that it is generated inside the block too. Deterministic mode is only warned about (an
    operator without a deterministic kernel still runs) and uninitialised memory is not filled.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    if not enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def _one_line(error: BaseException) -> str:
    """The error's type and the first line of its root cause (dynamo wraps a backend's error)."""
    root = error
    while root.__cause__ is not None or getattr(root, "inner_exception", None) is not None:
        root = root.__cause__ or root.inner_exception  # type: ignore[attr-defined]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    cause = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return cause if root is error else f"{type(error).__name__}, {cause}"


class CompiledForward:
    """A module's ``forward`` compiled by ``torch.compile``, falling back to eager once it fails.

    Set as the module's instance attribute ``forward`` by :func:`compile_network`. A deep copy of the
    module (an EMA teacher, a best-model copy) gets its own compiled forward, bound to the copy.

    Args:
        module: the module whose class ``forward`` is compiled.
        options: keyword arguments of ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...).
    """

    def __init__(self, module: nn.Module, options: dict[str, Any] | None = None) -> None:
        self.module = module
        self.options = dict(options or {})
        self.eager = type(module).forward.__get__(module)
        self.compiled = torch.compile(self.eager, **self.options)
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            args, kwargs = tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kwargs.items()}
            try:
                with deterministic_lowering():
                    return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = _one_line(error)
                logger.warning("torch.compile of %s failed, running eagerly (%s)", type(self.module).__name__,
                               self.failed[:300])
        return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> CompiledForward:
        module = memo.get(id(self.module))
        if module is None:  # the forward copied without its module: keep it bound to the original
            return self
        return CompiledForward(module, self.options)


def compile_network(network: nn.Module, enabled: bool = True, **options: Any) -> nn.Module:
    """Compile ``network``'s forward in place (``torch.compile``) and return the same module.

    The state dict, parameters and hooks are unchanged (no ``_orig_mod.`` prefixes), so
    checkpoints, resumption and exported weights work as without compilation; the generated code is
    deterministic (:func:`deterministic_lowering`), so a resumed run repeats the uninterrupted one
    bit for bit on the same machine. Compilation happens
    at the first call (and again for a new input shape or dtype); if it fails, one warning line is
    logged and the network runs eagerly. Failures of the compiled backward, which is compiled at the
    first backward, are not caught.

    Args:
        network: the module to compile; a DDP wrapper is compiled inside (its ``module``).
        enabled: ``False`` returns ``network`` untouched (the config switch ``compile``).
        options: keyword arguments of ``torch.compile``.

    Returns:
        ``network`` itself.

    Example:
        >>> net = compile_network(torch.nn.Linear(2, 2))
        >>> sorted(net.state_dict())
        ['bias', 'weight']
    """
    if not enabled:
        return network
    inner = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
    if not isinstance(inner.__dict__.get("forward"), CompiledForward):
        inner.forward = CompiledForward(inner, options)
    return network

