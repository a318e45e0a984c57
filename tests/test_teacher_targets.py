"""Remedies for collapse on small batches: Sinkhorn-Knopp teacher targets (``teacher_targets: sinkhorn``; values on
known logits, the equipartition that prevents one-hot and uniform collapse, the queue, their use by the loss and the
diagnostics) and batch normalisation in the projection heads (``head_batch_norm``)."""

from __future__ import annotations

import math

import pytest
import torch

from dagman_components.losses import DAGMaNLoss, DistillationCrossEntropy, entropy, sinkhorn_knopp


def test_two_by_two_symmetric_logits_give_the_softmax():
    # Q = exp(t) = [[e, 1], [1, e]] already has equal row and column sums: every round leaves it as it is
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = sinkhorn_knopp(t, teacher_temp=1.0)
    e = math.e
    assert torch.allclose(q, torch.tensor([[e / (1 + e), 1 / (1 + e)], [1 / (1 + e), e / (1 + e)]]), atol=1e-6)


def test_rows_sum_to_one_and_prototypes_are_used_equally():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 8, generator=g).tanh()
    q = sinkhorn_knopp(t, teacher_temp=0.1, n_iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-3)  # M/K per prototype


def test_every_token_preferring_one_prototype_is_spread_over_all_of_them():
    # one-hot collapse under a plain softmax: prototype 0 wins for all 16 tokens
    g = torch.Generator().manual_seed(1)
    t = torch.full((16, 4), -0.5)
    t[:, 0] = 0.5
    t += 0.05 * torch.randn(16, 4, generator=g)
    softmax = torch.softmax(t / 0.04, dim=-1)
    assert float(entropy(softmax.mean(0))) < 0.01  # every token: prototype 0
    q = sinkhorn_knopp(t, teacher_temp=0.04, n_iterations=20)
    assert float(entropy(q.mean(0))) == pytest.approx(math.log(4), abs=1e-3)  # batch marginal uniform


def test_identical_tokens_give_uniform_targets():
    t = torch.tensor([[0.9, -0.2, 0.1]]).repeat(5, 1)
    q = sinkhorn_knopp(t, teacher_temp=0.04)
    assert torch.allclose(q, torch.full((5, 3), 1 / 3), atol=1e-6)


def test_patch_tokens_keep_their_shape():
    t = torch.randn(2, 6, 5)
    q = sinkhorn_knopp(t, 0.07)
    assert q.shape == (2, 6, 5)
    assert torch.allclose(q.sum(-1), torch.ones(2, 6), atol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="centering"):
        DistillationCrossEntropy(4, targets="sinkhorm")


def _outputs(k: int, n: int, b: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"cls_logits": torch.randn(b, k, generator=g).tanh(), "patch_logits": torch.randn(b, n, k, generator=g).tanh(),
            "global_logits": torch.randn(b, k, generator=g).tanh()}


def test_loss_normalises_both_views_together():
    k, n, b, tau = 6, 4, 3, 0.05
    su, sv, tu, tv = (_outputs(k, n, b, seed) for seed in range(4))
    masks = (torch.ones(b, n), torch.ones(b, n))
    loss = DAGMaNLoss(out_dim=k, weights={"amip": 0.0}, teacher_targets="sinkhorn")
    _, parts = loss((su, sv), (tu, tv), masks, (None, None), (None, None), teacher_temp=tau)

    def ce(student, target):
        return -(target * torch.log_softmax(student / 0.1, dim=-1)).sum(-1).mean()

    both = sinkhorn_knopp(torch.cat([tu["cls_logits"], tv["cls_logits"]]), tau)
    expected_aitd = 0.5 * (ce(su["cls_logits"], both[b:]) + ce(sv["cls_logits"], both[:b]))
    assert float(parts["aitd"]) == pytest.approx(float(expected_aitd), rel=1e-5)
    # per view alone the targets would differ, so the value above really depends on the joint normalisation
    alone = sinkhorn_knopp(tv["cls_logits"], tau)
    assert not torch.allclose(alone, both[b:], atol=1e-4)
    patch = sinkhorn_knopp(torch.cat([tu["patch_logits"], tv["patch_logits"]]), tau)
    expected_ampd = 0.5 * (ce(su["patch_logits"], patch[:b]) + ce(sv["patch_logits"], patch[b:]))
    assert float(parts["ampd"]) == pytest.approx(float(expected_ampd), rel=1e-5)
    # the diagnostics see the same targets: teacher entropy of AITD
    d = loss.diagnostics((su, sv), (tu, tv), masks, tau)
    assert d["aitd/teacher_entropy"] == pytest.approx(float(entropy(both).mean()), rel=1e-5)
    assert d["aitd/kl"] == pytest.approx(float(expected_aitd) - d["aitd/teacher_entropy"], rel=1e-4)


def test_queue_keeps_the_newest_rows_and_joins_the_normalisation():
    ce = DistillationCrossEntropy(3, targets="sinkhorn", queue_size=4)
    first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    second = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    ce.update_center(first)
    assert int(ce.queue_filled) == 3
    ce.update_center(second)
    assert int(ce.queue_filled) == 4
    # newest first: second's rows reversed, then first's last two rows (the oldest row dropped)
    expected_queue = torch.stack([second[1], second[0], first[2], first[1]])
    assert torch.equal(ce.queue, expected_queue)
    t = torch.tensor([[0.2, -0.1, 0.3]])
    joint = sinkhorn_knopp(torch.cat([t, expected_queue]), 0.1)
    assert torch.allclose(ce.targets(t, 0.1), joint[:1], atol=1e-6)
    # a queue changes the targets of a single token (alone, Sinkhorn-Knopp would make it uniform)
    assert torch.allclose(sinkhorn_knopp(t, 0.1), torch.full((1, 3), 1 / 3), atol=1e-6)
    assert not torch.allclose(ce.targets(t, 0.1), torch.full((1, 3), 1 / 3), atol=1e-3)
    assert {"queue", "queue_filled"} <= set(ce.state_dict())


def test_queue_is_only_registered_when_used():
    assert "queue" not in DistillationCrossEntropy(3).state_dict()  # centring: old checkpoints still load
    assert "queue" not in DistillationCrossEntropy(3, targets="sinkhorn").state_dict()
    loss = DAGMaNLoss(out_dim=3, teacher_targets="sinkhorn", sinkhorn_queue=8)
    keys = set(loss.state_dict())
    assert {"cls_ce.queue", "global_ce.queue"} <= keys and "patch_ce.queue" not in keys
    with pytest.raises(ValueError, match="queue_size"):
        DistillationCrossEntropy(3, targets="sinkhorn", queue_size=-1)


def test_head_batch_norm_uses_batch_statistics_in_eval_mode_too():
    from dagman_components.networks.heads import ProjectionHead, TokenBatchNorm

    torch.manual_seed(0)
    bn = TokenBatchNorm(4)
    x = torch.randn(3, 5, 4) * 3.0 + 7.0
    y_train = bn.train()(x)
    y_eval = bn.eval()(x)
    assert torch.equal(y_train, y_eval)  # no running statistics: the EMA teacher (eval mode) normalises its own batch
    flat = y_eval.reshape(-1, 4)
    assert torch.allclose(flat.mean(0), torch.zeros(4), atol=1e-5)  # over samples and tokens together
    assert torch.allclose(flat.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    head = ProjectionHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6, batch_norm=True)
    assert sum(isinstance(m, TokenBatchNorm) for m in head.modules()) == 2  # after each hidden layer
    assert not any(isinstance(m, TokenBatchNorm) for m in ProjectionHead(8, 16, 12, 6).modules())


def test_head_batch_norm_spreads_nearly_identical_inputs():
    # a random encoder's [CLS] tokens of different crops differ by a few percent; the plain head keeps them
    # together, the batch-normalised head spreads them over the sphere
    from dagman_components.losses import feature_spread
    from dagman_components.networks.heads import ProjectionHead

    torch.manual_seed(0)
    common = torch.randn(1, 32)
    tokens = common + 0.02 * torch.randn(16, 32)
    plain = ProjectionHead(32, out_dim=64, hidden_dim=64, bottleneck_dim=16)
    normed = ProjectionHead(32, out_dim=64, hidden_dim=64, bottleneck_dim=16, batch_norm=True)
    with torch.no_grad():
        assert feature_spread(plain.embed(tokens)) < 0.1
        assert feature_spread(normed.embed(tokens)) > 0.5


def test_head_batch_norm_refuses_tiny_batches():
    from dagman_components.networks import check_head_batch_norm

    check_head_batch_norm(False, 1)
    check_head_batch_norm(True, 4)
    with pytest.raises(ValueError, match="head_batch_norm needs batch_size >= 4 \\(got 2\\)"):
        check_head_batch_norm(True, 2)


def _two_rank_targets(rank: int, init_file: str, full: torch.Tensor, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        part = full[rank * 4:(rank + 1) * 4]
        q = sinkhorn_knopp(part, 0.1)
        ce = DistillationCrossEntropy(full.shape[1], center_momentum=0.0)
        ce.update_center(part)
        gathered = [torch.zeros_like(q) for _ in range(2)]
        dist.all_gather(gathered, q)
        if rank == 0:
            torch.save({"targets": torch.cat(gathered), "center": ce.center}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_normalise_like_one_process_on_the_whole_batch(tmp_path):
    # under DDP the Sinkhorn-Knopp sums and the centre are all-reduced: 2 ranks x 4 tokens == 1 process x 8 tokens
    import torch.multiprocessing as mp

    full = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    out_file = str(tmp_path / "out.pt")
    mp.spawn(_two_rank_targets, args=(str(tmp_path / "init"), full, out_file), nprocs=2, join=True)
    result = torch.load(out_file, weights_only=True)
    assert torch.allclose(result["targets"], sinkhorn_knopp(full, 0.1), atol=1e-6)
    assert torch.allclose(result["center"], full.mean(0, keepdim=True), atol=1e-6)


def test_precomputed_targets_are_used_by_loss_and_diagnostics():
    # the trainer computes the step's targets once and passes them to both
    k, n, b, tau = 6, 4, 3, 0.05
    su, sv, tu, tv = (_outputs(k, n, b, seed) for seed in range(4))
    masks = (torch.ones(b, n), torch.ones(b, n))
    loss = DAGMaNLoss(out_dim=k, weights={"amip": 0.0}, teacher_targets="sinkhorn")
    targets = loss.teacher_targets((tu, tv), tau)
    _, own = loss((su, sv), (tu, tv), masks, (None, None), (None, None), teacher_temp=tau)
    _, given = loss((su, sv), (tu, tv), masks, (None, None), (None, None), teacher_temp=tau, targets=targets)
    assert all(torch.equal(own[key], given[key]) for key in ("aitd", "gitd", "ampd"))
    uniform = {key: (torch.full_like(p, 1 / k), torch.full_like(q, 1 / k)) for key, (p, q) in targets.items()}
    d = loss.diagnostics((su, sv), (tu, tv), masks, tau, targets=uniform)
    assert d["aitd/teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
