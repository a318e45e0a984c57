# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The project's one linear probe: an L2-regularised logistic regression on standardised frozen
features, fitted to its optimum by full-batch L-BFGS.

A probe answers "how linearly separable are these features?". It must not depend on the scale of
the features, on a learning rate or on how many steps an optimiser was given: those change the
answer from one encoder to the next (the classification bundle's former AdamW head ranked a
pretrained and a random encoder the wrong way round). The objective here is strictly convex, so
the fit is unique; it is solved in float64 with L-BFGS (strong-Wolfe line search) until the
gradient vanishes.

Objective (``N`` cases, class weights ``w``, standardised features ``z``)::

    sum_i w_i CE(W z_i + b, y_i) / sum_i w_i  +  ||W||^2 / (2 C N)

With balanced class weights (``N / (K n_k)``) and two classes this is scikit-learn's
``LogisticRegression(C=C, class_weight="balanced")`` divided by ``C N``: the same minimiser. Two
classes are fitted as one weight vector (the binary form); more classes as a multinomial
regression.

The fitted probe maps onto the classifier head ``BatchNorm1d(affine=False) -> Linear`` that the
classification bundle saves (:meth:`LogisticProbe.write_to_head`), so a probe is a whole model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LogisticProbe", "fit_logistic_probe", "class_weights", "DEFAULT_C"]

#: The inverse L2 strength of the project's probe (scikit-learn's default).
DEFAULT_C = 1.0
_EPS = 1e-5  # BatchNorm1d's default eps: the standardisation equals the head's norm in eval mode


@dataclass
class LogisticProbe:
    """A fitted probe: standardisation, then class logits.

    Attributes:
        mean: (C,) feature means of the training set.
        var: (C,) feature variances (population) of the training set.
        weight: (K, C) weights on the standardised features.
        bias: (K,) biases.
        C: the inverse L2 strength it was fitted with.
        objective: the objective's value at the solution.
        iterations: L-BFGS iterations used.
        eps: added to ``var`` before the square root (BatchNorm's eps).
    """

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    C: float
    objective: float
    iterations: int
    eps: float = _EPS

    def standardise(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)`` in float64, (N, C)."""
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        return (x.double() - self.mean) / torch.sqrt(self.var + self.eps)

    def logits(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class logits (N, K) of raw features (N, C)."""
        return self.standardise(features) @ self.weight.T + self.bias

    def probabilities(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, K) as a numpy array."""
        return torch.softmax(self.logits(features), dim=1).numpy()

    def write_to_head(self, head: nn.Module) -> None:
        """Copy the probe into a head ``norm`` (``BatchNorm1d(affine=False)``) -> ``fc`` (``Linear``).

        In eval mode the head then computes exactly :meth:`logits`, in its own dtype.

        Args:
            head: a module with ``norm`` and ``fc`` children of matching width.

        Raises:
            ValueError: when the head's widths or class count differ from the probe's.
        """
        norm, fc = head.norm, head.fc
        if fc.weight.shape != self.weight.shape:
            raise ValueError(f"the head's linear layer is {tuple(fc.weight.shape)}, the probe {tuple(self.weight.shape)}.")
        with torch.no_grad():
            norm.running_mean.copy_(self.mean)
            norm.running_var.copy_(self.var)
            norm.eps = self.eps
            fc.weight.copy_(self.weight)
            fc.bias.copy_(self.bias)


def class_weights(labels: np.ndarray, num_classes: int, balanced: bool = True) -> np.ndarray:
    """Per-case weights: ``N / (K n_k)`` for a case of class ``k`` (balanced), or 1.

    Raises:
        ValueError: when a class has no case (balanced weights are undefined).
    """
    y = np.asarray(labels).astype(int)
    if not balanced:
        return np.ones(len(y))
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"every class needs at least one case for a probe, got counts {counts.tolist()}.")
    return (len(y) / (num_classes * counts))[y]


def fit_logistic_probe(
    features: torch.Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    C: float = DEFAULT_C,
    num_classes: int | None = None,
    balanced: bool = True,
    max_iter: int = 1000,
    tolerance: float = 1e-9,
) -> LogisticProbe:
    """Fit the probe to its optimum (standardise, then L-BFGS on the convex objective, float64).

    Args:
        features: (N, C) training features, any scale.
        labels: (N,) integer classes ``0 .. K-1``.
        C: inverse L2 strength (larger: weaker regularisation).
        num_classes: K (default: ``max(labels) + 1``, at least 2).
        balanced: weight the classes to equal total weight (scikit-learn's ``"balanced"``).
        max_iter: L-BFGS iterations at most.
        tolerance: stop when the largest gradient entry falls below this.

    Returns:
        The fitted :class:`LogisticProbe`.

    Raises:
        ValueError: for non-finite features, ``C <= 0``, fewer than two classes present, or labels
            that do not match the features.

    Example:
        >>> x = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
        >>> probe = fit_logistic_probe(x, y)
        >>> bool(probe.probabilities(x)[3, 1] > 0.5)
        True
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64) if not isinstance(features, torch.Tensor) else features)
    x = x.double().flatten(1)
    y_np = np.asarray(labels).astype(int)
    if x.shape[0] != len(y_np) or x.shape[0] < 2:
        raise ValueError(f"the probe needs one label per feature row and at least 2 rows, got {x.shape[0]} rows "
                         f"and {len(y_np)} labels.")
    if not torch.isfinite(x).all():
        raise ValueError("the probe's features are not finite (diverged weights?).")
    if not C > 0:
        raise ValueError(f"the probe's C (inverse L2 strength) must be positive, got {C}.")
    k = int(num_classes) if num_classes is not None else max(2, int(y_np.max()) + 1)
    if len(np.unique(y_np)) < 2:
        raise ValueError("the probe needs cases of at least two classes.")
    mean, var = x.mean(0), x.var(0, unbiased=False)
    z = (x - mean) / torch.sqrt(var + _EPS)
    y = torch.as_tensor(y_np)
    w = torch.as_tensor(class_weights(y_np, k, balanced), dtype=torch.float64)
    n, c = z.shape
    rows = 1 if k == 2 else k  # two classes: one weight vector (scikit-learn's binary form)
    params = torch.zeros(rows, c + 1, dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (2.0 * float(C) * n)

    def objective() -> torch.Tensor:
        logits = _class_logits(z @ params[:, :c].T + params[:, c], k)
        ce = F.cross_entropy(logits, y, reduction="none")
        return (w * ce).sum() / w.sum() + penalty * params[:, :c].pow(2).sum()

    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=int(max_iter), tolerance_grad=tolerance,
                                  tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        value = float(objective())
        weight, bias = params[:, :c].clone(), params[:, c].clone()
        if k == 2:  # the binary score s = w.z + b as the logits (-s/2, s/2)
            weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    iterations = int(optimiser.state[params].get("n_iter", 0))
    if not math.isfinite(value):
        raise ValueError("the probe's fit diverged (non-finite objective).")
    return LogisticProbe(mean=mean, var=var, weight=weight, bias=bias, C=float(C), objective=value,
                         iterations=iterations)


def _class_logits(scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Two classes: one score ``s`` per case becomes the logits ``(-s/2, s/2)``; otherwise unchanged."""
    if num_classes != 2:
        return scores
    return torch.cat([-scores / 2, scores / 2], dim=-1)
