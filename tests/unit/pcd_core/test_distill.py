"""pcd_core.distill: each method against a hand computation, and PCD's every stage.

No models package here: the "networks" are tiny modules and leaf tensors shaped like the
model output dict (``out``, ``feat``, ``backbone``), so every expected value is known.
"""

from __future__ import annotations

import io
import math
import typing

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pcd_core.distill import PCD, build_method, list_methods, register_method, weight_factor
from pcd_core.distill.base import DistillMethod
from pcd_core.distill.losses import class_profile_gap
from pcd_core.distill.scoring import (
    ChannelClassStats,
    channel_scores,
    class_balanced_top_k,
    preferred_class,
)
from pcd_core.spec import MethodSpec

IGNORE = 255


def build(name: str, *, ct: int = 8, cs: int = 4, k: int = 3, **kw: typing.Any) -> DistillMethod:
    return build_method(
        MethodSpec(name=name, **kw),
        teacher_channels=ct,
        student_channels=cs,
        num_classes=k,
        ignore_index=IGNORE,
    )


class FeatureTeacher(nn.Module):
    """Returns its input (subsampled by ``stride``) as the tap: tests choose F_t exactly."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = x[:, :, :: self.stride, :: self.stride] * self.scale
        return {"out": x * self.scale, "feat": f, "backbone": f}


def outputs(b: int = 2, c: int = 8, k: int = 3, hw: tuple[int, int] = (6, 7), grad: bool = False):
    g = torch.Generator().manual_seed(c * 100 + k)
    feat = torch.randn(b, c, *hw, generator=g).requires_grad_(grad)
    logits = torch.randn(b, k, hw[0] * 2, hw[1] * 2, generator=g).requires_grad_(grad)
    return {"out": logits, "feat": feat, "backbone": feat}


def labels(b: int = 2, hw: tuple[int, int] = (12, 14), k: int = 3, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k, (b, *hw), generator=g)
    lab[torch.rand(b, *hw, generator=g) < 0.2] = IGNORE
    return lab


def manual_spatial_kl(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)) over one map's locations, times tau^2 (scalar)."""
    ps = torch.exp(s.flatten() / tau) / torch.exp(s.flatten() / tau).sum()
    pt = torch.exp(t.flatten() / tau) / torch.exp(t.flatten() / tau).sum()
    return (pt * torch.log(pt / ps)).sum() * tau**2


def prepared_pcd(scores: Tensor, *, cs: int, **kw: typing.Any) -> PCD:
    """PCD with the given channel scores; the feature term alone unless ``logit_kd_weight``
    is passed (the default's pixel KD needs teacher logits these tests do not build)."""
    kw.setdefault("logit_kd_weight", 0.0)
    m = build("pcd", ct=scores.numel(), cs=cs, **kw)
    assert isinstance(m, PCD)
    m.set_scores(scores)
    return m


# -- registry and interface ------------------------------------------------------------------


def test_registry_matches_spec_and_refuses_duplicates() -> None:
    choices = typing.get_args(MethodSpec.model_fields["name"].annotation)
    assert list_methods() == sorted(choices)
    with pytest.raises(ValueError, match="already registered"):
        register_method("kd")(DistillMethod)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_gives_finite_weighted_losses(name: str) -> None:
    m = build(name, cwd_on="features", logit_kd_weight=0.5)
    t = FeatureTeacher()
    t_out = outputs(c=8)
    s_out = outputs(c=4, hw=(3, 4), grad=True)  # smaller student maps: resized to the teacher's
    target = labels()
    m.prepare(t, [(t_out["out"].repeat(1, 3, 1, 1)[:, :8], target)], torch.device("cpu"))
    losses = m(s_out, {k: v.detach() for k, v in t_out.items()}, target, 0)
    assert m.needs_teacher == (name != "none")
    assert set(losses) <= {"kd", "cwd", "pcd"} and (name == "none") == (not losses)
    for v in losses.values():
        assert v.ndim == 0 and torch.isfinite(v) and v > 0
    if losses:
        sum(losses.values()).backward()
        assert s_out["feat"].grad is not None or s_out["out"].grad is not None


def test_tap_key_follows_spec() -> None:
    assert build("pcd").tap_key == "feat"
    assert build("pcd", tap="backbone").tap_key == "backbone"
    assert build("pcd", tap="head_preact").tap_key == "feat_preact"


# -- kd --------------------------------------------------------------------------------------


def test_kd_zero_for_equal_logits_and_matches_manual_formula() -> None:
    m = build("kd", tau=2.0, weight=3.0)
    s, t = torch.randn(1, 3, 2, 3), torch.randn(1, 3, 2, 3)
    target = torch.tensor([[[0, 1, IGNORE], [2, IGNORE, 1]]])
    assert m({"out": t}, {"out": t}, target, 0)["kd"].abs() < 1e-6
    total, n = 0.0, 0
    for i in range(2):
        for j in range(3):
            if target[0, i, j] == IGNORE:
                continue
            ps = torch.softmax(s[0, :, i, j] / 2.0, 0)
            pt = torch.softmax(t[0, :, i, j] / 2.0, 0)
            total += float((pt * (pt / ps).log()).sum())
            n += 1
    expected = 3.0 * 4.0 * total / n
    assert m({"out": s}, {"out": t}, target, 0)["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_ignores_void_pixels() -> None:
    m = build("kd")
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    target = labels(hw=(4, 4))
    base = m({"out": s}, {"out": t}, target, 0)["kd"]
    s_void = s.clone()
    s_void[:, :, target[0] == IGNORE] += 100.0  # perturb only where batch item 0 is void ...
    s_void[1] = s[1]  # ... and only in batch item 0
    assert m({"out": s_void}, {"out": t}, target, 0)["kd"] == pytest.approx(base.item())
    s_valid = s.clone()
    i, j = (target[0] != IGNORE).nonzero()[0].tolist()
    s_valid[0, :, i, j] += torch.tensor([5.0, -5.0, 0.0])
    assert m({"out": s_valid}, {"out": t}, target, 0)["kd"] != pytest.approx(base.item())


# -- cwd -------------------------------------------------------------------------------------


def test_cwd_on_logits_matches_manual_formula() -> None:
    m = build("cwd", tau=3.0, weight=2.0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = sum(manual_spatial_kl(s[b, c], t[b, c], 3.0) for b in range(2) for c in range(3))
    expected = 2.0 * float(expected) / 6
    assert not list(m.parameters())
    assert m({"out": s}, {"out": t}, labels(), 0)["cwd"].item() == pytest.approx(expected, rel=1e-5)


def test_cwd_on_features_has_a_trainable_adapter() -> None:
    m = build("cwd", cwd_on="features", ct=8, cs=4)
    params = list(m.parameters())
    assert params and all(p.requires_grad for p in params)
    assert m.adapter is not None and m.adapter.weight.shape == (8, 4, 1, 1)
    m({"feat": torch.randn(2, 4, 5, 5)}, {"feat": torch.randn(2, 8, 5, 5)}, labels(), 0)[
        "cwd"
    ].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# -- PCD: scoring ----------------------------------------------------------------------------


def _scoring_batch(seed: int) -> tuple[Tensor, Tensor]:
    """Channel 0 separates classes, 1 is large label-free noise, 2 is a big constant-ish offset."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 3, (2, 16, 16), generator=g)
    feat = torch.stack(
        [
            3.0 * lab.float() + 0.5 * torch.randn(2, 16, 16, generator=g),
            10.0 * torch.randn(2, 16, 16, generator=g),
            50.0 + 0.1 * torch.randn(2, 16, 16, generator=g),
        ],
        dim=1,
    )
    lab[torch.rand(2, 16, 16, generator=g) < 0.1] = IGNORE
    return feat, lab


@pytest.mark.parametrize(("score", "best"), [("class_gap", 0), ("fisher", 0), ("l1", 2)])
def test_discriminative_channel_outranks_others(score: str, best: int) -> None:
    m = build("pcd", ct=3, cs=1, score=score, score_batches=4)
    assert isinstance(m, PCD)
    summary = m.prepare(FeatureTeacher(), [_scoring_batch(s) for s in range(4)], "cpu")
    assert summary["batches"] == 4 and summary["classes_present"] == 3
    assert int(m.scores.argmax()) == best and int(m.kept[0]) == best
    if score != "l1":  # the label-free noise channel is worse than the separating one by far
        assert m.scores[0] > 10 * m.scores[1]


def test_random_score_is_seeded() -> None:
    a = channel_scores(ChannelClassStats(16, 3, IGNORE), "random", seed=1)
    b = channel_scores(ChannelClassStats(16, 3, IGNORE), "random", seed=1)
    assert torch.equal(a, b) and a.unique().numel() == 16


def _numpy_reference(batches: list[tuple[Tensor, Tensor]], k: int):
    """Class means, class_gap and fisher by explicit loops (labels subsampled like nearest)."""
    xs, ls = [], []
    for img, lab in batches:
        f = img[:, :, ::2, ::2].double().numpy()  # the teacher's stride-2 tap
        lab = lab[:, ::2, ::2].numpy()  # nearest downsampling by 2 picks even rows/cols
        xs.append(f.transpose(1, 0, 2, 3).reshape(f.shape[1], -1))
        ls.append(lab.reshape(-1))
    x, lab = np.concatenate(xs, 1), np.concatenate(ls)
    x, lab = x[:, lab != IGNORE], lab[lab != IGNORE]
    present = [c for c in range(k) if (lab == c).any()]
    mu = np.full((x.shape[0], k), np.nan)
    for c in present:
        mu[:, c] = x[:, lab == c].mean(1)
    pairs = [(i, j) for i in present for j in present if i < j]
    gap = np.mean([np.abs(mu[:, i] - mu[:, j]) for i, j in pairs], axis=0) / x.std(1)
    between = sum((lab == c).sum() * (mu[:, c] - x.mean(1)) ** 2 for c in present) / x.shape[1]
    within = sum(((x[:, lab == c] - mu[:, [c]]) ** 2).sum(1) for c in present) / x.shape[1]
    return mu, gap, between / within


def test_class_means_and_scores_are_exact_over_batches_with_ignore() -> None:
    k = 4  # class 3 never appears: it must not enter the pairs
    batches = [
        (torch.randn(2, 5, 8, 10) * (s + 1), labels(hw=(8, 10), k=3, seed=s)) for s in range(3)
    ]
    mu_ref, gap_ref, fisher_ref = _numpy_reference(batches, k)

    stats = ChannelClassStats(5, k, IGNORE)
    for img, lab in batches:
        stats.update(img[:, :, ::2, ::2], lab)  # labels at full res: downsampled inside
    np.testing.assert_allclose(stats.class_means().numpy(), mu_ref, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(channel_scores(stats, "class_gap").numpy(), gap_ref, rtol=1e-9)
    np.testing.assert_allclose(channel_scores(stats, "fisher").numpy(), fisher_ref, rtol=1e-9)

    m = build("pcd", ct=5, cs=2, k=k, score_batches=3)
    extra = (torch.full((2, 5, 8, 10), 1e6), labels(hw=(8, 10)))  # a 4th batch must be unused
    m.prepare(FeatureTeacher(stride=2), [*batches, extra], torch.device("cpu"))
    np.testing.assert_allclose(m.scores.numpy(), gap_ref, rtol=1e-5)
    assert m.kept.tolist() == np.argsort(-gap_ref, kind="stable")[:2].tolist()


def test_class_balanced_pruning_serves_every_class_that_top_k_starves() -> None:
    scores = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    assert class_balanced_top_k(scores, classes, 3).tolist() == [0, 4, 6]  # one per class
    assert class_balanced_top_k(scores, classes, 5).tolist() == [0, 1, 4, 5, 6]
    top = prepared_pcd(scores, cs=3)
    assert top.kept.tolist() == [0, 1, 2]  # top_k: class 0 only
    bal = build("pcd", ct=7, cs=3, prune="class_balanced")
    assert isinstance(bal, PCD)
    bal.set_scores(scores, classes)
    assert bal.kept.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="class_balanced"):
        bal.set_scores(scores)


def test_preferred_class_is_the_largest_standardised_class_mean() -> None:
    stats = ChannelClassStats(3, 4, IGNORE)  # class 3 never appears
    for s in range(3):
        feat, lab = _scoring_batch(s)  # channel 0 grows with the class index: prefers 2
        feat[:, 2] = 50.0 - 5.0 * (lab.clamp(max=2) == 0).float()  # channel 2 dips on class 0
        stats.update(feat, lab)
    pref = preferred_class(stats)
    assert pref[0] == 2 and pref[2] != 0 and int(pref.max()) < 3


def test_class_balanced_prepare_keeps_a_channel_per_class() -> None:
    m = build("pcd", ct=3, cs=2, score_batches=2, prune="class_balanced")
    assert isinstance(m, PCD)
    m.prepare(FeatureTeacher(), [_scoring_batch(s) for s in range(2)], "cpu")
    pref = preferred_class_of_batches([_scoring_batch(s) for s in range(2)])
    assert len({int(pref[c]) for c in m.kept}) == min(2, len(set(pref.tolist())))


def preferred_class_of_batches(batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    stats = ChannelClassStats(batches[0][0].shape[1], 3, IGNORE)
    for feat, lab in batches:
        stats.update(feat, lab)
    return preferred_class(stats)


def test_scoring_needs_two_classes() -> None:
    stats = ChannelClassStats(2, 3, IGNORE)
    stats.update(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        channel_scores(stats, "class_gap")


def test_prepare_leaves_teacher_unchanged_and_skips_when_restored() -> None:
    teacher = FeatureTeacher().train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = build("pcd", ct=3, cs=2)
    m.prepare(teacher, [_scoring_batch(0)], "cpu")
    assert teacher.training and teacher.scale.grad is None
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert m.prepare(teacher, [_scoring_batch(1)], "cpu")["skipped"] is True


# -- PCD: pruning and matching ---------------------------------------------------------------


def test_keep_may_not_exceed_teacher_channels() -> None:
    with pytest.raises(ValueError, match="keep=9 > teacher channels 8"):
        build("pcd", ct=8, cs=4, keep=9)


def test_keep_below_student_width_pairs_each_kept_channel_with_its_own_student_channel(
) -> None:
    """K < Cs: the Hungarian pairs every kept channel with the student channel that copies
    it, leaves the other student channels out of the loss (no gradient), and ``identity``
    pairs kept channel i with student channel i."""
    scores = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5, 0.7, 0.2, 0.6])
    t = torch.randn(2, 8, 6, 7)
    kept = torch.argsort(scores, descending=True)[:3]  # K = 3 of a 6-channel student
    s = torch.randn(2, 6, 6, 7)
    s[:, 4], s[:, 1], s[:, 5] = t[:, kept[0]], t[:, kept[1]], t[:, kept[2]]
    s.requires_grad_(True)
    m = prepared_pcd(scores, cs=6, keep=3)
    loss = m({"feat": s}, {"feat": t}, labels(), 0)["pcd"]
    assert m.rematched and m.student_index is not None
    pairs = dict(zip(m.student_index.tolist(), m.assignment.tolist(), strict=True))
    assert pairs == {1: int(kept[1]), 4: int(kept[0]), 5: int(kept[2])}
    assert loss.item() < 1e-6
    moved = s.detach().clone()
    moved[:, [0, 2, 3]] = torch.randn(2, 3, 6, 7)  # the free channels: no part in the loss
    moved.requires_grad_(True)
    again = m({"feat": moved}, {"feat": t}, labels(), 1)["pcd"]
    again = again + 0.0 * moved.sum()  # a graph to every channel, so .grad is a tensor
    again.backward()
    assert again.item() < 1e-6 and moved.grad is not None
    assert moved.grad[:, [0, 2, 3]].abs().max() == 0
    ident = prepared_pcd(scores, cs=6, keep=3, match="identity")
    ident({"feat": s}, {"feat": t}, labels(), 0)
    assert ident.student_index is not None
    assert ident.student_index.tolist() == [0, 1, 2] and ident.assignment.tolist() == \
        kept.tolist()


def test_keep_below_student_width_resumes_its_pairs_and_the_default_has_no_new_buffer(
) -> None:
    """The student side of the pairs is state (a resume must not re-pair); at K >= Cs it
    does not exist, so checkpoints from before K < Cs was allowed load as they did."""
    a = prepared_pcd(torch.rand(8), cs=6, keep=3, rematch_every=5)
    t, s = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4)
    a({"feat": s}, {"feat": t}, labels(), 0)
    b = build("pcd", ct=8, cs=6, keep=3, rematch_every=5, logit_kd_weight=0.0)
    b.load_state_dict(a.state_dict())
    assert isinstance(b, PCD) and b.student_index is not None and a.student_index is not None
    assert torch.equal(a.student_index, b.student_index)
    s2 = torch.randn(2, 6, 4, 4)
    assert torch.equal(a({"feat": s2}, {"feat": t}, labels(), 1)["pcd"],
                       b({"feat": s2}, {"feat": t}, labels(), 1)["pcd"])
    assert "student_index" not in build("pcd", ct=8, cs=4, keep=6).state_dict()
    assert "student_index" not in build("pcd", ct=8, cs=4).state_dict()


@pytest.mark.parametrize("keep", [6, 8])
def test_hungarian_recovers_a_permutation_identity_does_not(keep: int) -> None:
    scores = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5, 0.7, 0.2, 0.6])
    t = torch.randn(2, 8, 6, 7)
    kept = torch.argsort(scores, descending=True)[:6]  # the student's width: 6
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    s = t[:, kept[perm]]  # student channel c == kept teacher channel perm[c]
    losses = {}
    for match in ("hungarian", "identity"):
        m = prepared_pcd(scores, cs=6, keep=keep, match=match)
        losses[match] = m({"feat": s}, {"feat": t}, labels(), 0)["pcd"].item()
        if match == "hungarian":
            assert m.rematched and m.assignment.tolist() == kept[perm].tolist()
        else:
            assert m.assignment.tolist() == kept.tolist()
    assert losses["hungarian"] < 1e-6 < 0.1 < losses["identity"]


def test_pcd_loss_zero_iff_student_equals_matched_teacher() -> None:
    m = prepared_pcd(torch.rand(8), cs=4, match="identity")
    t = torch.randn(2, 8, 5, 6)
    s = t.index_select(1, m.assignment).clone()
    assert m({"feat": s}, {"feat": t}, labels(), 0)["pcd"].abs() < 1e-6
    s[:, 2] += torch.randn(2, 5, 6)
    assert m({"feat": s}, {"feat": t}, labels(), 1)["pcd"] > 1e-3


def test_score_weighting_matches_hand_computation() -> None:
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5])
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    kw = {"cs": 3, "match": "identity", "tau": 2.0, "weight": 1.5}
    plain = prepared_pcd(scores, score_weighting=False, **kw)
    weighted = prepared_pcd(scores, score_weighting=True, **kw)
    matched = [0, 2, 3]  # the top-3 channels, in descending score
    w = torch.tensor([4.0, 3.0, 2.0]) / 3.0
    kl = torch.tensor(
        [
            [float(manual_spatial_kl(s[b, c], t[b, matched[c]], 2.0)) for c in range(3)]
            for b in range(2)
        ]
    )  # (B,Cs)
    got_w = weighted({"feat": s}, {"feat": t}, labels(), 0)["pcd"].item()
    got_p = plain({"feat": s}, {"feat": t}, labels(), 0)["pcd"].item()
    assert got_w == pytest.approx(1.5 * float((kl * w).mean()), rel=1e-5)
    assert got_p == pytest.approx(1.5 * float(kl.mean()), rel=1e-5)
    assert got_w != pytest.approx(got_p)


def test_pearson_feature_loss_matches_hand_computation_and_ignores_scale_and_offset() -> None:
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5])
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    m = prepared_pcd(scores, cs=3, match="identity", feature_loss="pearson", weight=2.0)
    matched = [0, 2, 3]  # the top-3 channels, in descending score
    gaps = [1.0 - float(np.corrcoef(s[b, c].flatten().numpy(),
                                    t[b, matched[c]].flatten().numpy())[0, 1])
            for b in range(2) for c in range(3)]
    got = m({"feat": s}, {"feat": t}, labels(), 0)["pcd"].item()
    assert got == pytest.approx(2.0 * sum(gaps) / 6, rel=1e-4)
    # a student channel that is the matched teacher map times 5 plus 3 costs nothing
    copied = t.index_select(1, m.assignment) * 5.0 + 3.0
    assert m({"feat": copied}, {"feat": t}, labels(), 1)["pcd"].abs() < 1e-5
    # the opposite map costs the most (2), and a constant map is finite and uncorrelated
    assert m({"feat": -copied}, {"feat": t}, labels(), 2)["pcd"].item() == pytest.approx(4.0)
    flat = torch.ones(2, 3, 4, 4, requires_grad=True)
    loss = m({"feat": flat}, {"feat": t}, labels(), 3)["pcd"]
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and torch.isfinite(flat.grad).all()


def hand_class_profile_gap(s: Tensor, t: Tensor, lab: Tensor, k: int) -> list[float]:
    """1 - Pearson r over present classes of each channel's class means, with numpy."""
    ss, tt, ll = s.numpy(), t.numpy(), lab.numpy()
    present = [c for c in range(k) if (ll == c).any()]
    gaps = []
    for ch in range(s.shape[1]):
        sp = [ss[:, ch][ll == c].mean() for c in present]
        tp = [tt[:, ch][ll == c].mean() for c in present]
        gaps.append(1.0 - float(np.corrcoef(sp, tp)[0, 1]))
    return gaps


def test_class_profile_feature_loss_matches_hand_computation() -> None:
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5])
    s, t = torch.randn(2, 3, 6, 7), torch.randn(2, 5, 6, 7)
    lab = labels(hw=(6, 7), k=4)  # void pixels included: they must not count
    m = prepared_pcd(scores, cs=3, k=4, match="identity", feature_loss="class_profile",
                     weight=2.0)
    matched = [0, 2, 3]  # the top-3 channels, in descending score
    gaps = hand_class_profile_gap(s, t[:, matched], lab, 4)
    got = m({"feat": s}, {"feat": t}, lab, 0)["pcd"].item()
    assert got == pytest.approx(2.0 * sum(gaps) / 3, rel=1e-4)
    # any scale and offset of the teacher's profile costs nothing, its opposite the most
    copied = t.index_select(1, m.assignment) * 5.0 + 3.0
    assert m({"feat": copied}, {"feat": t}, lab, 1)["pcd"].abs() < 1e-5
    assert m({"feat": -copied}, {"feat": t}, lab, 2)["pcd"].item() == pytest.approx(4.0)
    # where in the image a channel fires is free: moving pixels within a class changes nothing
    g = torch.Generator().manual_seed(1)
    shuffled = s.clone()
    for c in range(4):
        where = (lab == c).nonzero(as_tuple=True)
        perm = torch.randperm(where[0].numel(), generator=g)
        shuffled[where[0], :, where[1], where[2]] = s[where[0][perm], :, where[1][perm],
                                                      where[2][perm]]
    again = m({"feat": shuffled}, {"feat": t}, lab, 3)["pcd"].item()
    assert again == pytest.approx(got, rel=1e-5)
    assert not torch.equal(shuffled, s)


def test_class_profile_gap_resizes_labels_and_needs_two_classes() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    lab = labels(hw=(8, 8), k=3, seed=2)
    got = class_profile_gap(s, t, lab, num_classes=3, ignore_index=IGNORE)
    want = hand_class_profile_gap(s, t, lab[:, ::2, ::2], 3)  # nearest: every other pixel
    assert got.tolist() == pytest.approx(want, rel=1e-4)
    one_class = torch.full((2, 4, 4), 1)
    one_class[0, 0, 0] = IGNORE
    flat = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = class_profile_gap(flat, t, one_class, num_classes=3, ignore_index=IGNORE)
    assert loss.tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    assert flat.grad is not None and torch.isfinite(flat.grad).all()


def test_rematch_exactly_at_multiples_of_rematch_every() -> None:
    m = prepared_pcd(torch.rand(8), cs=4, rematch_every=3)
    t, s = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    hits = []
    for it in range(11):
        m({"feat": s}, {"feat": t}, labels(), it)
        hits.append(m.rematched)
        assert m.info["rematched"] == m.rematched
    assert [i for i, h in enumerate(hits) if h] == [0, 3, 6, 9]
    m({"feat": s}, {"feat": t}, labels(), 9)  # the same iteration again: already matched
    assert not m.rematched
    late = prepared_pcd(torch.rand(8), cs=4, rematch_every=3)
    late({"feat": s}, {"feat": t}, labels(), 4)  # never matched: the first forward matches
    assert late.rematched and int(late.match_iteration) == 4


def test_state_dict_round_trip_restores_matching_exactly() -> None:
    a = prepared_pcd(torch.rand(8), cs=4, keep=6, rematch_every=5)
    t, s = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    a({"feat": s}, {"feat": t}, labels(), 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build("pcd", ct=8, cs=4, keep=6, rematch_every=5, logit_kd_weight=0.0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("scores", "kept", "assignment", "match_iteration", "prepared"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    s2 = torch.randn(2, 4, 4, 4)
    la = a({"feat": s2}, {"feat": t}, labels(), 1)["pcd"]
    lb = b({"feat": s2}, {"feat": t}, labels(), 1)["pcd"]
    assert not b.rematched and torch.equal(la, lb)
    b({"feat": s2}, {"feat": t}, labels(), 5)
    assert b.rematched


def test_adapter_distils_kept_channels_in_score_order_through_a_trainable_1x1() -> None:
    scores = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5, 0.7])
    m = prepared_pcd(scores, cs=4, keep=2, adapter=True, tau=2.0, weight=1.5)  # K < Cs is fine
    assert m.adapter is not None and m.adapter.weight.shape == (2, 4, 1, 1)
    assert m.kept.tolist() == [1, 3]
    s = torch.randn(2, 4, 5, 6, requires_grad=True)
    t = torch.randn(2, 6, 5, 6)
    loss = m({"feat": s}, {"feat": t}, labels(), 0)["pcd"]
    projected = m.adapter(s).detach()
    kl = [float(manual_spatial_kl(projected[b, k], t[b, [1, 3][k]], 2.0))
          for b in range(2) for k in range(2)]
    assert loss.item() == pytest.approx(1.5 * sum(kl) / 4, rel=1e-5)
    assert not m.rematched  # nothing to match: adapter output k pairs with kept channel k
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())


def test_adapter_round_trips_through_state_dict() -> None:
    a = prepared_pcd(torch.rand(8), cs=4, keep=8, adapter=True)
    b = build("pcd", ct=8, cs=4, keep=8, adapter=True, logit_kd_weight=0.0)
    b.load_state_dict(a.state_dict())
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    assert torch.equal(a({"feat": s}, {"feat": t}, labels(), 0)["pcd"],
                       b({"feat": s}, {"feat": t}, labels(), 0)["pcd"])


def test_weight_factor_is_one_or_falls_linearly_to_zero() -> None:
    assert [weight_factor("constant", i, 4) for i in range(4)] == [1.0] * 4
    assert [weight_factor("linear_decay", i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="unknown weight_schedule"):
        weight_factor("cosine", 0, 4)


@pytest.mark.parametrize(("logit_kd_schedule", "kd_factor"),
                         [(None, 0.25), ("constant", 1.0), ("linear_decay", 0.25)])
def test_the_loop_scales_pcd_logit_kd_by_its_own_schedule(
    logit_kd_schedule: str | None, kd_factor: float
) -> None:
    """At step 3 of 4 under linear_decay the feature term is x 0.25; the logit KD term is
    x 0.25 too unless ``logit_kd_schedule`` gives it its own schedule."""
    from types import SimpleNamespace

    from pcd_core.spec import RunSpec
    from pcd_core.train import compute_losses

    spec = RunSpec.model_validate({
        "dataset": {"uri": "/d", "num_classes": 3, "ignore_index": IGNORE},
        "student": {"arch": "deeplabv3_resnet18"},
        "teacher": {"arch": "deeplabv3_resnet50", "checkpoint": "/t"},
        "method": {"name": "pcd", "weight_schedule": "linear_decay", "logit_kd_weight": 1.0,
                   "logit_kd_schedule": logit_kd_schedule},
        "train": {"iterations": 4},
    })
    method = prepared_pcd(torch.rand(8), cs=4, weight_schedule="linear_decay",
                          logit_kd_weight=1.0, logit_kd_schedule=logit_kd_schedule)
    s_out, t_out = outputs(c=4), outputs(c=8)
    target = labels()
    unscaled = method(s_out, t_out, target, 3)

    class Fixed(nn.Module):
        def __init__(self, out: dict[str, Tensor]) -> None:
            super().__init__()
            self.fixed = out

        def forward(self, img: Tensor) -> dict[str, Tensor]:
            return self.fixed

    models = SimpleNamespace(method=method, teacher=Fixed(t_out), class_weights=None)
    losses = compute_losses(spec, models, Fixed(s_out), torch.zeros(2, 3, 12, 14), target, 3,
                            None)  # type: ignore[arg-type]
    assert losses["pcd"].item() == pytest.approx(0.25 * unscaled["pcd"].item(), rel=1e-6)
    assert losses["kd"].item() == pytest.approx(kd_factor * unscaled["kd"].item(), rel=1e-6)
    assert build("kd", weight_schedule="linear_decay").loss_schedule("kd") == "linear_decay"


def test_pcd_requires_prepare() -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        build("pcd")(
            {"feat": torch.randn(1, 4, 2, 2)},
            {"feat": torch.randn(1, 8, 2, 2)},
            labels(1, (2, 2)),
            0,
        )


# -- pcd's optional logit kd -------------------------------------------------------------


@pytest.mark.parametrize(("logit_kd_tau", "expected_tau"), [(None, 4.0), (1.0, 1.0), (2.5, 2.5)])
def test_pcd_logit_kd_is_the_kd_baseline_at_its_own_temperature(
    logit_kd_tau: float | None, expected_tau: float
) -> None:
    """PCD's logit term equals method kd's loss at ``logit_kd_tau`` (left out: PCD's tau)."""
    m = prepared_pcd(torch.rand(8), cs=4, tau=4.0, logit_kd_weight=0.5,
                     logit_kd_tau=logit_kd_tau)
    s_out, t_out = outputs(c=4), outputs(c=8)
    target = labels()
    kd = build("kd", tau=expected_tau, weight=0.5)
    expected = kd({"out": s_out["out"]}, {"out": t_out["out"]}, target, 0)["kd"]
    got = m(s_out, t_out, target, 0)["kd"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    other = build("kd", tau=expected_tau + 1.0, weight=0.5)
    assert got.item() != pytest.approx(
        other({"out": s_out["out"]}, {"out": t_out["out"]}, target, 0)["kd"].item(), rel=1e-3)


# -- the teacher is never trained ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"name": "kd"},
        {"name": "cwd"},
        {"name": "cwd", "cwd_on": "features"},
        {"name": "pcd", "logit_kd_weight": 1.0},
        {"name": "pcd", "adapter": True},
        {"name": "pcd", "feature_loss": "pearson"},
        {"name": "pcd", "feature_loss": "class_profile"},
    ],
    ids=["kd", "cwd-logits", "cwd-features", "pcd+kd", "pcd-adapter", "pcd-pearson",
         "pcd-class-profile"],
)
def test_no_gradient_reaches_the_teacher(kw: dict[str, typing.Any]) -> None:
    teacher = FeatureTeacher()
    x = torch.randn(2, 8, 6, 6)
    t_out = teacher(x)  # built WITH autograd on: the method must detach it
    assert t_out["feat"].requires_grad
    m = build(ct=8, cs=4, **kw)
    if isinstance(m, PCD):
        m.set_scores(torch.rand(8))
    s_out = {
        "feat": torch.randn(2, 4, 6, 6, requires_grad=True),
        "out": torch.randn(2, 3, 6, 6, requires_grad=True),
    }
    t_out["out"] = t_out["out"][:, :3]
    loss = sum(m(s_out, t_out, labels(hw=(6, 6)), 0).values())
    loss.backward()
    assert teacher.scale.grad is None
    assert s_out["feat"].grad is not None or s_out["out"].grad is not None
    assert math.isfinite(loss.item())
