"""benchmarks/eval_instances.py's metric functions on hand cases with known IoU, recall and precision."""

import numpy as np
import pytest
from sjtest import bench_module

EI = bench_module("eval_instances")


def box(r0, r1, c0, c1, shape=(10, 10)):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_iou_matrix_hand_values():
    gt_a = box(0, 4, 0, 4)  # 16 px
    gt_b = box(6, 10, 6, 10)  # 16 px
    cands = [box(0, 4, 0, 2),  # half of a: 8 / 16 = 0.5
             box(0, 4, 0, 5),  # a plus a 4-px column: 16 / 20 = 0.8
             box(5, 10, 5, 10)]  # b inside 25 px: 16 / 25 = 0.64
    iou = EI.iou_matrix(cands, [gt_a, gt_b])
    np.testing.assert_allclose(iou, [[0.5, 0.0], [0.8, 0.0], [0.0, 0.64]])
    assert EI.iou_matrix([], [gt_a]).shape == (0, 1) and EI.iou_matrix([gt_a], []).shape == (1, 0)


def test_match_recall_best_iou_precision():
    gt_a, gt_b, gt_c = box(0, 4, 0, 4), box(6, 10, 6, 10), box(0, 2, 8, 10)  # c: 4 px, no candidate near it
    cands = [box(0, 4, 0, 2), box(5, 10, 5, 10), box(8, 10, 0, 3)]  # IoU 0.5 with a, 0.64 with b, nothing
    m = EI.match(cands, [gt_a, gt_b, gt_c])
    np.testing.assert_allclose(m["best_iou"], [0.5, 0.64, 0.0])
    assert m["recalled"].tolist() == [True, True, False]  # IoU exactly 0.5 counts
    assert m["precise"].tolist() == [True, True, False]
    # a stricter threshold loses the half-box
    m = EI.match(cands, [gt_a, gt_b, gt_c], thr=0.6)
    assert m["recalled"].tolist() == [False, True, False] and m["precise"].tolist() == [False, True, False]
    # no candidates: nothing recalled, best IoU 0
    m = EI.match([], [gt_a])
    assert m["best_iou"].tolist() == [0.0] and m["recalled"].tolist() == [False] and m["precise"].size == 0


def test_summarise_pools_instances_and_paired_differences():
    gt_a, gt_b = box(0, 4, 0, 4), box(6, 10, 6, 10)
    img1 = dict(EI.match([box(0, 4, 0, 2), box(5, 10, 5, 10)], [gt_a, gt_b]), seconds=1.0)  # 2 of 2, IoU .5/.64
    img2 = dict(EI.match([box(0, 1, 0, 1)], [gt_a]), seconds=3.0)  # IoU 1/16, not recalled, candidate imprecise
    img3 = dict(EI.match([box(0, 4, 0, 4)], []), seconds=2.0)  # no GT: candidates count, no recall entry
    s = EI.summarise([img1, img2, img3])
    assert s["instances"] == 3 and s["images"] == 3
    assert s["candidates"] == pytest.approx(4 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["best_iou"] == pytest.approx((0.5 + 0.64 + 1 / 16) / 3)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["seconds"] == pytest.approx(2.0)
    np.testing.assert_allclose(s["img_recall"], [1.0, 0.0, np.nan])
    d = EI.paired(s["img_recall"], [0.0, 0.0, 1.0])  # the NaN image is left out
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.5) and d["better"] == 1 and d["worse"] == 0
    assert d["se"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))


def test_instances_gt_keeps_each_polygon_and_drops_small(tmp_path):
    # two overlapping polygons stay two full instances (no painter's occlusion); a tiny one is dropped
    meta = {"id": 1, "height": 64, "width": 64, "file_name": "x.jpg"}
    sq = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    anns = [{"image_id": 1, "area": 1024, "segmentation": sq(0, 0, 32, 32), "category_id": 3},
            {"image_id": 1, "area": 512, "segmentation": sq(16, 16, 48, 32), "category_id": 3},
            {"image_id": 1, "area": 1, "segmentation": sq(60, 60, 61, 61), "category_id": 5},
            {"image_id": 1, "area": 900, "segmentation": {"counts": [0, 10], "size": [64, 64]}, "iscrowd": 1,
             "category_id": 1}]
    inst = EI.Instances.__new__(EI.Instances)
    inst.gt = type("G", (), {"meta": {"x": meta}, "anns": {1: anns}})()
    inst.min_share, inst.grid = 0.01, (8, 8)
    masks = inst("coco", "x")
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[0], box(0, 4, 0, 4, (8, 8)))
    np.testing.assert_array_equal(masks[1], box(2, 4, 2, 6, (8, 8)))
