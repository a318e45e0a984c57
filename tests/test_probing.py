"""The one linear-probe protocol (dagman_components.probing), its trainer and the fine-tuning groups."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import dagman_components.classification as nc
from dagman_components.engines import LinearProbeTrainer
from dagman_components.networks import SwinDAGMaN
from dagman_components.optim.param_groups import swin_dagman_layer_ids
from dagman_components.probing import fit_logistic_probe, probe_scores, select_logistic_probe


def _separable(n: int = 400, dim: int = 20, seed: int = 0, noise: float = 2.0):
    """Features with a known separating direction (noisy labels), one dimension scaled by 1000."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    direction = rng.normal(size=dim)
    y = (x @ direction + noise * rng.normal(size=n) > 0.5).astype(int)
    x[:, 3] *= 1000.0
    return x, y, direction


def test_probe_reaches_the_exact_solution_whatever_the_feature_scale():
    x, y, _ = _separable()
    train, test = slice(0, 300), slice(300, None)
    probe = fit_logistic_probe(x[train], y[train], C=1.0)
    # the exact optimum of the same objective, solved by scikit-learn to a tight tolerance
    scaler = StandardScaler().fit(x[train])
    exact = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-12, max_iter=100000).fit(scaler.transform(x[train]), y[train])
    np.testing.assert_allclose(2 * probe.weight[1].numpy(), exact.coef_[0], atol=1e-5)
    assert 2 * probe.bias[1].item() == pytest.approx(exact.intercept_[0], abs=1e-5)
    auc_probe = roc_auc_score(y[test], probe.probabilities(x[test])[:, 1])
    auc_exact = roc_auc_score(y[test], exact.predict_proba(scaler.transform(x[test]))[:, 1])
    assert auc_probe == pytest.approx(auc_exact, abs=1e-9)
    assert auc_probe > 0.8


def test_a_fixed_step_budget_on_raw_features_does_not_reach_it_but_the_probe_does():
    """The failure this protocol replaces: AdamW at 1e-3 for a few hundred steps on unscaled features."""
    x, y, _ = _separable(seed=1)
    train, test = slice(0, 300), slice(300, None)
    torch.manual_seed(0)
    fc = nn.Linear(x.shape[1], 2)
    opt = torch.optim.AdamW(fc.parameters(), lr=1e-3)
    xt, yt = torch.as_tensor(x[train], dtype=torch.float32), torch.as_tensor(y[train])
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(fc(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        auc_sgd = roc_auc_score(y[test], fc(torch.as_tensor(x[test], dtype=torch.float32))[:, 1].numpy())
    auc_probe = roc_auc_score(y[test], fit_logistic_probe(x[train], y[train]).probabilities(x[test])[:, 1])
    assert auc_probe > auc_sgd + 0.1


def test_probe_written_into_the_classifier_head_gives_its_logits():
    x, y, _ = _separable(n=60, dim=8)
    probe = fit_logistic_probe(x, y, C=0.5)
    head = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(8, affine=False), fc=nn.Linear(8, 2))).double().eval()
    probe.write_to_head(head)
    with torch.no_grad():
        torch.testing.assert_close(head(torch.as_tensor(x)), probe.logits(x), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="linear layer"):
        probe.write_to_head(nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(8, affine=False), fc=nn.Linear(8, 3))))


def test_probe_refuses_bad_input_with_a_clear_message():
    x, y, _ = _separable(n=20, dim=4)
    with pytest.raises(ValueError, match="two classes"):
        fit_logistic_probe(x, np.zeros(20, int))
    with pytest.raises(ValueError, match="not finite"):
        fit_logistic_probe(np.full((20, 4), np.nan), y)
    with pytest.raises(ValueError, match="C"):
        fit_logistic_probe(x, y, C=0)


def test_selection_keeps_the_C_with_the_best_validation_auc_and_ties_keep_the_first():
    x, y, _ = _separable(n=300, dim=30, seed=2, noise=4.0)
    probe, aucs = select_logistic_probe(x[:150], y[:150], x[150:], y[150:], Cs=[1e-4, 1.0, 100.0])
    assert probe.C == max(aucs, key=aucs.get)
    expected = {c: roc_auc_score(y[150:], fit_logistic_probe(x[:150], y[:150], C=c).probabilities(x[150:])[:, 1])
                for c in (1e-4, 1.0, 100.0)}
    assert aucs == pytest.approx(expected)
    # constant features: every C scores 0.5 and the first is kept
    probe, aucs = select_logistic_probe(np.ones((20, 3)), y[:20], np.ones((10, 3)), y[20:30], Cs=[0.1, 1.0])
    assert probe.C == 0.1 and set(aucs.values()) == {0.5}


def test_cross_validated_scores_score_every_case_once():
    x, y, _ = _separable(n=90, dim=5)
    folds = [np.arange(0, 30), np.arange(30, 60), np.arange(60, 90)]
    result = probe_scores(x, y, folds)
    assert result.scored.all() and len(result.fold_aucs) == 3 and result.chosen_C == [1.0] * 3
    first = fit_logistic_probe(x[30:], y[30:]).probabilities(x[:30])[:, 1]
    np.testing.assert_allclose(result.scores[:30], first)


def test_linear_probe_trainer_fits_one_C_per_epoch_into_the_head():
    x, y, _ = _separable(n=40, dim=6)
    data = [{"image": torch.as_tensor(x[i], dtype=torch.float32), "label": int(y[i])} for i in range(40)]
    head = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(6, affine=False), fc=nn.Linear(6, 2)))
    seen = []
    trainer = LinearProbeTrainer("cpu", data, head, Cs=[0.01, 1.0])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append((e.state.output["C"], head.fc.weight.detach().clone())))
    trainer.run()
    assert [c for c, _ in seen] == [0.01, 1.0] and trainer.state.iteration == 2
    expected = fit_logistic_probe(np.stack([d["image"].numpy() for d in data]), y, C=1.0)
    torch.testing.assert_close(head.fc.weight.detach(), expected.weight.float(), rtol=1e-4, atol=1e-5)
    assert seen[0][1].abs().sum() < seen[1][1].abs().sum()  # stronger regularisation, smaller weights
    with pytest.raises(ValueError, match="probe_Cs"):
        LinearProbeTrainer("cpu", data, head, Cs=[])


def test_layer_decay_groups_give_each_depth_its_rate():
    net = nc.NoduleClassifier(SwinDAGMaN(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3), sa_stage=2,
                                         sa_heads=4))
    ids = swin_dagman_layer_ids(net.encoder)
    # patch embedding 0, stage-1 blocks 1-2 (merging with the last), stage-2 blocks 3-4, SA 5-6, stage 3 7-8, ...
    assert ids["patch_embed.proj.weight"] == 0 and ids["layers1.0.blocks.1.mlp.linear1.weight"] == 2
    assert ids["layers2.0.downsample.reduction.weight"] == 4 and ids["sa.cls_token"] == 5
    assert ids["sa.blocks.1.attn.qkv.weight"] == 6 and ids["layers3.0.blocks.0.norm1.weight"] == 7
    groups = nc.classifier_param_groups(net, lr=1.0, weight_decay=0.05, encoder_lr_factor=0.5, layer_decay=0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(net.named_parameters())
    assert rate[id(params["head.fc.weight"])] == 1.0
    # the [CLS] head sits at depth 7: SA's last block trains at 0.5 * 0.5, the patch embedding at 0.5 * 0.5**7
    assert rate[id(params["encoder.sa.blocks.1.attn.qkv.weight"])] == pytest.approx(0.25)
    assert rate[id(params["encoder.patch_embed.proj.weight"])] == pytest.approx(0.5 * 0.5 ** 7)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(params["encoder.sa.cls_token"])] == 0.0 and decay[id(params["encoder.patch_embed.proj.weight"])] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(params)
    with pytest.raises(ValueError, match="layer_decay"):
        nc.classifier_param_groups(net, 1.0, layer_decay=1.5)
