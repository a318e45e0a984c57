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
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CompiledForward", "compile_network"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A MONAI ``MetaTensor`` as a plain tensor (dynamo would trace its metadata); anything else as it is."""
    return value.as_tensor() if isinstance(value, torch.Tensor) and hasattr(value, "as_tensor") else value


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
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
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
    checkpoints, resumption and exported weights work as without compilation. Compilation happens
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

