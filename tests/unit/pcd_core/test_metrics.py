"""pcd_core.metrics against hand-computed cases: every expected number is derived in a comment,
so a wrong convention (ignore pixels counted, absent classes averaged in, per-image instead of
dataset-level boundary counts, boundaries at ignore pixels) fails a test."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pcd_core.metrics import SegmentationMetrics, boundary_map, class_iou_mean

IGN = 255


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_confusion_iou_and_pixel_acc_by_hand() -> None:
    target = t([[0, 0, 1], [1, 2, IGN]]).unsqueeze(0)  # (1, 2, 3)
    pred = t([[0, 1, 1], [1, 2, 0]]).unsqueeze(0)
    m = SegmentationMetrics(4, IGN)
    m.update(pred, target)
    # Valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2); the ignore pixel is dropped.
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2] = 1, 1, 2, 1
    assert torch.equal(m.confusion, expected)
    r = m.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1/1; class 3 absent.
    assert r["per_class_iou"] == pytest.approx([0.5, 2 / 3, 1.0, None])
    assert r["per_class_iou"][3] is None
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 5)


def test_predicted_but_absent_class_counts_as_zero() -> None:
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    pred = t([[0, 0], [0, 1]]).unsqueeze(0)
    m = SegmentationMetrics(3, IGN)
    m.update(pred, target)
    r = m.compute()
    # class 0: TP 3, FN 1 -> 3/4; class 1: FP 1 -> 0 (in the mean); class 2: None.
    assert r["per_class_iou"] == pytest.approx([0.75, 0.0, None])
    assert r["miou"] == pytest.approx(0.375)


def test_accumulation_is_independent_of_batching() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (4, 9, 11), generator=g)
    target[target == 3] = IGN
    pred = torch.randint(0, 3, (4, 9, 11), generator=g)
    whole, parts = SegmentationMetrics(3, IGN), SegmentationMetrics(3, IGN)
    whole.update(pred, target)
    for i in range(4):
        parts.update(pred[i], target[i])  # (H, W) is accepted too
    assert torch.equal(whole.confusion, parts.confusion)
    assert torch.equal(whole.boundary, parts.boundary)
    assert whole.compute() == parts.compute()


def test_bad_inputs_raise() -> None:
    m = SegmentationMetrics(3, IGN)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.int64), t([[0, 7], [0, 0]]).unsqueeze(0))
    with pytest.raises(ValueError, match="differ"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 3, dtype=torch.int64))


def test_empty_metrics_are_zero_and_nan_free() -> None:
    r = SegmentationMetrics(3, IGN).compute()
    assert (r["miou"], r["pixel_acc"], r["boundary_f"]) == (0.0, 0.0, 0.0)
    assert r["per_class_iou"] == [None, None, None]


def split_image(h: int, w: int, col: int) -> torch.Tensor:
    """(h, w): class 0 left of column ``col``, class 1 from it on."""
    x = torch.zeros(h, w, dtype=torch.int64)
    x[:, col:] = 1
    return x


def test_boundary_map_marks_both_sides_and_not_the_frame_edge() -> None:
    lab = split_image(3, 6, 3)
    b = boundary_map(lab, torch.ones_like(lab, dtype=torch.bool))
    assert b.nonzero()[:, 1].unique().tolist() == [2, 3]  # the two columns that meet
    valid = torch.ones_like(b)
    valid[:, 3] = False  # an ignore column between the classes: no boundary at all
    assert not boundary_map(lab, valid).any()


@pytest.mark.parametrize(("tol", "expected"), [(1, 1.0), (0, 0.0)])
def test_boundary_shifted_by_one_pixel(tol: int, expected: float) -> None:
    # Target boundary columns 4 (class 0) and 5 (class 1); prediction's 5 and 6: every
    # boundary pixel is exactly 1 px from its counterpart -> all matched iff tol >= 1.
    m = SegmentationMetrics(2, IGN, boundary_tolerance=tol)
    m.update(split_image(4, 10, 6).unsqueeze(0), split_image(4, 10, 5).unsqueeze(0))
    assert m.compute()["boundary_f"] == pytest.approx(expected)


@pytest.mark.parametrize(("tol", "expected"), [(0, 0.0), (1, 0.5), (2, 1.0)])
def test_boundary_counts_accumulate_over_images(tol: int, expected: float) -> None:
    # Two one-row images, target split at column 6 in both. Image A predicts the split at 7
    # (1 px off), image B at 8 (2 px off). With tol 1, per class 1 of 2 pred boundary pixels
    # and 1 of 2 target boundary pixels match: P = R = 1/2, F = 1/2 for both classes
    # (averaging per-image F instead would also give 1/2 here, but tol 0 and 2 pin the
    # distance convention: 0 -> nothing matches, 2 -> everything does).
    target = torch.stack([split_image(1, 12, 6), split_image(1, 12, 6)])
    pred = torch.stack([split_image(1, 12, 7), split_image(1, 12, 8)])
    m = SegmentationMetrics(2, IGN, boundary_tolerance=tol)
    m.update(pred, target)
    r = m.compute()
    assert r["boundary_f"] == pytest.approx(expected)
    assert r["per_class_boundary_f"] == pytest.approx([expected, expected])
    if tol == 1:  # rows: pred boundary px, matched; target boundary px, matched
        assert m.boundary.tolist() == [[2, 2], [1, 1], [2, 2], [1, 1]]


def test_boundary_precision_and_recall_differ() -> None:
    # One row, target 0 on cols 0-7, 1 on 8-15. The prediction equals it plus a spurious
    # class-0 pixel at col 13. Pred boundaries: class 0 at cols 7, 13 (1 of 2 matched:
    # P0 = 1/2, R0 = 1, F0 = 2/3); class 1 at cols 8, 12, 14 (1 of 3: P1 = 1/3, R1 = 1,
    # F1 = 1/2). boundary_f = (2/3 + 1/2) / 2 = 7/12.
    target = split_image(1, 16, 8).unsqueeze(0)
    pred = target.clone()
    pred[0, 0, 13] = 0
    m = SegmentationMetrics(2, IGN, boundary_tolerance=1)
    m.update(pred, target)
    r = m.compute()
    assert r["per_class_boundary_f"] == pytest.approx([2 / 3, 1 / 2])
    assert r["boundary_f"] == pytest.approx(7 / 12)


def test_hallucinated_blob_scores_zero_boundary_f() -> None:
    # Target all class 0 (no boundary); prediction puts a 1-px class-1 blob in the middle:
    # both classes have predicted boundary pixels and no target ones -> P = R = 0, F = 0.
    target = torch.zeros(1, 5, 5, dtype=torch.int64)
    pred = target.clone()
    pred[0, 2, 2] = 1
    m = SegmentationMetrics(2, IGN)
    m.update(pred, target)
    r = m.compute()
    assert r["boundary_f"] == 0.0
    assert r["per_class_iou"] == pytest.approx([24 / 25, 0.0])


def test_ignore_pixels_change_nothing() -> None:
    # Whatever is predicted under ignore pixels changes neither IoU nor boundary F.
    target = split_image(6, 8, 4).unsqueeze(0)
    target[0, 1:4, 1:3] = IGN
    good, noisy = target.clamp(max=1).clone(), target.clamp(max=1).clone()
    good[target == IGN] = 0
    noisy[target == IGN] = 1
    results = []
    for pred in (good, noisy):
        m = SegmentationMetrics(2, IGN)
        m.update(pred, target)
        results.append(m.compute())
    assert results[0] == results[1]
    assert results[0]["miou"] == 1.0 and results[0]["boundary_f"] == 1.0


def test_no_boundaries_anywhere_is_vacuously_perfect() -> None:
    m = SegmentationMetrics(3, IGN)
    m.update(torch.ones(1, 4, 4, dtype=torch.int64), torch.ones(1, 4, 4, dtype=torch.int64))
    r = m.compute()
    assert r["boundary_f"] == 1.0 and r["per_class_boundary_f"] == [None, None, None]


def test_reduce_is_a_noop_without_a_process_group() -> None:
    m = SegmentationMetrics(2, IGN)
    m.update(split_image(2, 4, 2).unsqueeze(0), split_image(2, 4, 2).unsqueeze(0))
    before = m.compute()
    m.reduce_across_processes()
    assert m.compute() == before


def test_reduce_sums_over_a_single_rank_gloo_group(tmp_path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        m = SegmentationMetrics(2, IGN)
        m.update(split_image(2, 4, 1).unsqueeze(0), split_image(2, 4, 2).unsqueeze(0))
        confusion, boundary = m.confusion.clone(), m.boundary.clone()
        m.reduce_across_processes()  # world of one: the sum is the rank's own counts
        assert torch.equal(m.confusion, confusion) and torch.equal(m.boundary, boundary)
    finally:
        dist.destroy_process_group()


def test_class_iou_mean() -> None:
    ious = [0.5, None, 1.0, 0.25]
    assert class_iou_mean(ious, [0, 1, 3]) == pytest.approx(0.375)
    assert class_iou_mean(ious, [1]) is None
