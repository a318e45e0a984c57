#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Why did the classification bundle's former linear probe rank encoders the wrong way round?

On one labelled nodule folder, for each encoder, every patient-grouped fold of one seed, this script
replays the former head training (BatchNorm without affine + Linear, AdamW at 1e-3 with a one-epoch
warm-up and cosine decay, 30 epochs of batch 16, balanced cross-entropy, one of 4 cached augmented
views per crop per epoch, the epoch picked on validation AUC) and changes one ingredient at a time:

* ``adamw_aug_val``: the former protocol;
* ``adamw_aug_last``: the same, last epoch (no selection on the validation cases);
* ``adamw_noaug_val``: without augmented views (the crop's own features);
* ``lbfgs_aug``: the probe's optimum on all 4 augmented views of each crop;
* ``lbfgs``: the probe's optimum on the crops' own features (the project's protocol now).

It writes ``linear_probe_cause.json`` and ``linear_probe_cause.png`` (test AUC per arm and encoder;
validation AUC per epoch of the former protocol; the former head's training objective against the
probe's optimum on the same features).

Example::

    python scripts/linear_probe_cause.py --nodules /scratch/lidc_split/heldout --output /scratch/cause \\
        --encoder random=random:/scratch/recipe/models/model.pt --encoder recipe=/scratch/recipe/models/model.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARMS = ("adamw_aug_val", "adamw_aug_last", "adamw_noaug_val", "lbfgs_aug", "lbfgs")
VIEWS = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodules", required=True)
    p.add_argument("--encoder", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    return p.parse_args(argv)


def view_features(encoder: nn.Module, images: torch.Tensor, seed: int) -> torch.Tensor:
    """(VIEWS, N, C) [CLS] features: view 0 the crop itself, views 1.. augmented as the former bundle did."""
    from monai.transforms import Compose

    from dagman_components.classification import nodule_augmentation
    from dagman_components.data.resumable import derive_seed
    from dagman_components.features.frozen_features import frozen_features, image_batches

    augment = Compose(nodule_augmentation())
    views = []
    for v in range(VIEWS):
        if v == 0:
            batch = images.float()
        else:
            batch = torch.stack([torch.as_tensor(augment.set_random_state(derive_seed(seed, v, i))({"image": img.float()})["image"])
                                 for i, img in enumerate(images)])
        views.append(frozen_features(encoder, image_batches(batch, 32), ["cls"], "cpu", f"view {v}")["cls"])
    return torch.stack(views).double()


def adamw_head(views: torch.Tensor, y: np.ndarray, train: np.ndarray, val: np.ndarray, epochs: int, augment: bool,
               seed: int) -> dict:
    """The former head training; validation AUC, test-time head per epoch and the training objective."""
    from sklearn.metrics import roc_auc_score

    from dagman_components.optim.schedules import warmup_cosine_schedule

    torch.manual_seed(seed)
    c = views.shape[-1]
    head = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(c, affine=False), fc=nn.Linear(c, 2))).double()
    nn.init.trunc_normal_(head.fc.weight, std=0.01)
    nn.init.zeros_(head.fc.bias)
    counts = np.bincount(y[train], minlength=2)
    weight = torch.as_tensor(len(train) / (2 * counts), dtype=torch.float64)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    bs = min(16, len(train))
    steps_per_epoch = len(train) // bs
    lrs = warmup_cosine_schedule(1e-3, epochs * steps_per_epoch, steps_per_epoch, 1e-3)
    rng = np.random.default_rng(seed)
    yt = torch.as_tensor(y)
    history, states, step = [], [], 0
    for _ in range(epochs):
        head.train()
        order = rng.permutation(train)
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            v = rng.integers(0, VIEWS, len(idx)) if augment else np.zeros(len(idx), int)
            for g in opt.param_groups:
                g["lr"] = float(lrs[step])
            opt.zero_grad()
            F.cross_entropy(head(views[v, idx]), yt[idx], weight=weight).backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            val_auc = roc_auc_score(y[val], torch.softmax(head(views[0, val]), 1)[:, 1].numpy())
            train_obj = float(F.cross_entropy(head(views[0, train]), yt[train], weight=weight))
        history.append({"val_auc": float(val_auc), "train_objective": train_obj})
        states.append({k: t.clone() for k, t in head.state_dict().items()})
    return {"history": history, "states": states, "head": head}


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    from dagman_components.atomic import atomic_write_png, atomic_write_text
    from dagman_components.classification import cv_split
    from dagman_components.classification import encoder_comparison as ec
    from dagman_components.weights.encoder_io import card_path, prepare_encoder
    from dagman_components.visualize.backend import pyplot
    from dagman_components.probing import fit_logistic_probe

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    specs = [ec.parse_encoder_spec(e) for e in args.encoder]
    args.output.mkdir(parents=True, exist_ok=True)
    nodules = ec.load_nodule_set(args.nodules, cache=args.output / "nodules.pt")
    y, index = nodules.labels, {i: n for n, i in enumerate(nodules.ids)}
    result: dict = {"arms": list(ARMS), "encoders": {}}
    for spec in specs:
        encoder = (prepare_encoder(None, card=card_path(spec.like), seed=args.seed) if spec.weights is None
                   else prepare_encoder(spec.weights))
        views = view_features(encoder, nodules.images, args.seed)
        per_arm = {a: [] for a in ARMS}
        curves = []
        for fold in range(args.folds):
            split = cv_split(nodules.items, n_folds=args.folds, fold=fold, seed=args.seed)
            train, val, test = (np.array([index[str(it["id"])] for it in split[k]]) for k in ("train", "val", "test"))

            def auc_of(head: nn.Module) -> float:
                with torch.no_grad():
                    return float(roc_auc_score(y[test], torch.softmax(head(views[0, test]), 1)[:, 1].numpy()))

            for augment, arm_val, arm_last in ((True, "adamw_aug_val", "adamw_aug_last"), (False, "adamw_noaug_val", None)):
                run = adamw_head(views, y, train, val, args.epochs, augment, args.seed + fold)
                best = int(np.argmax([h["val_auc"] for h in run["history"]]))
                run["head"].load_state_dict(run["states"][best])
                per_arm[arm_val].append(auc_of(run["head"]))
                if arm_last:
                    run["head"].load_state_dict(run["states"][-1])
                    per_arm[arm_last].append(auc_of(run["head"]))
                    optimum = fit_logistic_probe(views[0, train], y[train])
                    curves.append({"fold": fold, "history": run["history"], "best_epoch": best + 1,
                                   "probe_objective_unregularised": float(
                                       _weighted_ce(optimum.logits(views[0, train]), y[train]))})
            all_views = views[:, train].reshape(-1, views.shape[-1])
            per_arm["lbfgs_aug"].append(float(roc_auc_score(
                y[test], fit_logistic_probe(all_views, np.tile(y[train], VIEWS)).probabilities(views[0, test])[:, 1])))
            per_arm["lbfgs"].append(float(roc_auc_score(
                y[test], fit_logistic_probe(views[0, train], y[train]).probabilities(views[0, test])[:, 1])))
        result["encoders"][spec.name] = {"test_auc": {a: float(np.mean(v)) for a, v in per_arm.items()},
                                         "test_auc_folds": per_arm, "curves": curves}
        logging.info("%s: %s", spec.name, {a: round(float(np.mean(v)), 3) for a, v in per_arm.items()})
    atomic_write_text(json.dumps(result, indent=1), args.output / "linear_probe_cause.json")

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
    width = 0.8 / len(specs)
    for k, spec in enumerate(specs):
        r = result["encoders"][spec.name]
        axes[0].bar(np.arange(len(ARMS)) + k * width, [r["test_auc"][a] for a in ARMS], width, label=spec.name)
        for c in r["curves"]:
            epochs = np.arange(1, len(c["history"]) + 1)
            axes[1].plot(epochs, [h["val_auc"] for h in c["history"]], color=f"C{k}", alpha=0.7,
                         label=spec.name if c["fold"] == 0 else None)
            axes[2].plot(epochs, [h["train_objective"] - c["probe_objective_unregularised"] for h in c["history"]],
                         color=f"C{k}", alpha=0.7, label=spec.name if c["fold"] == 0 else None)
    axes[0].set_xticks(np.arange(len(ARMS)) + 0.4 - width / 2, ARMS, rotation=20, fontsize=8)
    axes[0].set_ylim(0.5, 1.0)
    axes[0].set_ylabel(f"test AUC (mean of {args.folds} folds)")
    axes[0].set_title("one ingredient at a time")
    axes[0].legend()
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation AUC")
    axes[1].set_title("former protocol (AdamW, augmented views)")
    axes[1].legend()
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("training CE minus the probe optimum's CE")
    axes[2].set_yscale("symlog", linthresh=0.01)
    axes[2].set_title("how far the former head is from the optimum")
    axes[2].legend()
    fig.tight_layout()
    atomic_write_png(fig, args.output / "linear_probe_cause.png", close=True)
    print(json.dumps({s: result["encoders"][s]["test_auc"] for s in result["encoders"]}, indent=1))
    return 0


def _weighted_ce(logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2)
    weight = torch.as_tensor(len(labels) / (2 * counts), dtype=torch.float64)
    return F.cross_entropy(logits, torch.as_tensor(labels), weight=weight)


if __name__ == "__main__":
    sys.exit(main())
