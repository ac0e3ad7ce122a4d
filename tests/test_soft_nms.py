"""batched_soft_nms against oracles: ensemble_boxes.soft_nms, torchvision's batched_nms and a naive reference."""
import math

import numpy as np
import pytest
import torch
import torchvision
from ensemble_boxes import soft_nms as eb_soft_nms

from d2_defects.layers.soft_nms import batched_soft_nms

SEEDS = [0, 1, 2, 3, 4]
IMG = 200.0  # image side, for ensemble-boxes' [0, 1] coordinates


def random_detections(seed, n=300, num_ids=4, dtype=torch.float32):
    """Boxes clustered around a few objects (so that many overlap), distinct scores (no ties)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(12, 2, generator=g) * 140 + 30
    sizes = torch.rand(12, 2, generator=g) * 40 + 10
    obj = torch.randint(0, 12, (n,), generator=g)
    c = centers[obj] + torch.randn(n, 2, generator=g) * 4
    wh = sizes[obj] * (1 + 0.2 * torch.randn(n, 2, generator=g)).clamp(min=0.3)
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(0, IMG).to(dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    idxs = torch.randint(0, num_ids, (n,), generator=g)
    assert len(torch.unique(scores)) == n  # ties avoided
    assert bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all())
    return boxes, scores, idxs


def naive_soft_nms(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    """Per-box reference (Bodla et al. 2017): pick the best live box, decay its same-id neighbours, prune."""
    iou = torchvision.ops.box_iou(boxes.double(), boxes.double()).numpy()
    s = scores.double().numpy().copy()
    ids = idxs.tolist()
    live = [i for i in range(len(s)) if s[i] >= score_threshold]
    keep, final = [], []
    while live:
        i = max(live, key=lambda k: (s[k], -k))
        live.remove(i)
        keep.append(i)
        final.append(s[i])
        for j in list(live):
            if ids[j] != ids[i]:
                continue
            if method == "linear":
                s[j] *= (1 - iou[i, j]) if iou[i, j] > iou_threshold else 1.0
            elif method == "gaussian":
                s[j] *= math.exp(-iou[i, j] ** 2 / sigma)
            elif iou[i, j] > iou_threshold:
                live.remove(j)
                continue
            if s[j] < score_threshold:
                live.remove(j)
    return keep, final


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method,eb_method", [("linear", 1), ("gaussian", 2)])
def test_same_kept_set_as_ensemble_boxes(seed, method, eb_method):
    boxes, scores, idxs = random_detections(seed)
    iou_thr, sigma, thr = 0.5, 0.5, 0.05
    keep, _ = batched_soft_nms(boxes, scores, idxs, method, sigma=sigma, iou_threshold=iou_thr, score_threshold=thr)
    eb_boxes, eb_scores, eb_labels = eb_soft_nms(
        [(boxes.double() / IMG).numpy()], [scores.double().numpy()], [idxs.numpy()],
        method=eb_method, iou_thr=iou_thr, sigma=sigma, thresh=thr,
    )
    # ensemble-boxes returns the kept boxes with their original scores: map back through the (unique) scores.
    by_score = {float(s): i for i, s in enumerate(scores.double().tolist())}
    eb_keep = {by_score[float(s)] for s in eb_scores}
    assert len(eb_keep) == len(eb_scores)
    assert set(keep.tolist()) == eb_keep
    # the decay really happened: some boxes were dropped, and the result is not hard NMS
    assert 0 < len(keep) < len(boxes)
    hard = torchvision.ops.batched_nms(boxes, scores, idxs, iou_thr)
    assert set(keep.tolist()) != set(hard.tolist())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_decayed_scores_match_naive_reference(seed, method):
    boxes, scores, idxs = random_detections(seed, n=200)
    args = dict(method=method, sigma=0.3, iou_threshold=0.4, score_threshold=0.01)
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, **args)
    ref_keep, ref_scores = naive_soft_nms(boxes, scores, idxs, **args)
    assert keep.dtype == torch.int64 and new_scores.dtype == scores.dtype
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(new_scores.double().numpy(), np.array(ref_scores), rtol=0, atol=1e-5)
    assert bool((new_scores[:-1] >= new_scores[1:]).all())  # sorted, descending


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_hard_equals_torchvision_batched_nms(seed, iou_threshold):
    boxes, scores, idxs = random_detections(seed, n=500, num_ids=5)
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, "hard", iou_threshold=iou_threshold, score_threshold=0.0)
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    assert torch.equal(keep, ref)
    assert torch.equal(new_scores, scores[ref])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_torch_path_identical_to_numba_path(seed, method):
    boxes, scores, idxs = random_detections(seed, n=250, num_ids=3)
    for thr in (0.0, 0.2):
        a = batched_soft_nms(boxes, scores, idxs, method, 0.5, 0.3, thr, backend="numba")
        b = batched_soft_nms(boxes, scores, idxs, method, 0.5, 0.3, thr, backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
def test_torch_path_matches_numba_path_on_float64(seed, method):
    # float64 results are not rounded to a narrower dtype, so the last-bit differences of the float64
    # arithmetic show (the torch path multiplies the decays of one round as one product): same boxes in the
    # same order, scores within 1e-15.
    boxes, scores, idxs = random_detections(seed, n=250, num_ids=3, dtype=torch.float64)
    for thr in (0.0, 0.2):
        a = batched_soft_nms(boxes, scores, idxs, method, 0.5, 0.3, thr, backend="numba")
        b = batched_soft_nms(boxes, scores, idxs, method, 0.5, 0.3, thr, backend="torch")
        assert a[1].dtype == b[1].dtype == torch.float64
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-15)
        if method != "hard":
            assert bool((a[1] < scores[a[0]]).any())  # scores were decayed (not a trivial comparison)


def test_ties_and_duplicates_are_deterministic_on_both_paths():
    # exact duplicates (IoU 1) with equal scores: the lower index wins, the same on both paths
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9])
    idxs = torch.zeros(4, dtype=torch.int64)
    for method in ("linear", "gaussian", "hard"):
        a = batched_soft_nms(boxes, scores, idxs, method, backend="numba")
        b = batched_soft_nms(boxes, scores, idxs, method, backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0][0] == 1
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, "linear", iou_threshold=0.3)
    assert 2 not in keep.tolist()  # its duplicate (IoU 1) decays it to 0


def test_different_ids_never_interact():
    boxes = torch.tensor([[0, 0, 10, 10]] * 3, dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    for backend in ("numba", "torch"):
        keep, new_scores = batched_soft_nms(boxes, scores, torch.tensor([0, 1, 2]), "gaussian", backend=backend)
        assert keep.tolist() == [0, 1, 2] and torch.equal(new_scores, scores)
        keep, new_scores = batched_soft_nms(boxes, scores, torch.tensor([0, 0, 2]), "gaussian", backend=backend)
        assert keep.tolist() == [0, 2, 1]
        assert new_scores[2].item() == pytest.approx(0.8 * math.exp(-1 / 0.5))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_empty_and_single_box(backend):
    for dtype in (torch.float32, torch.float16):
        keep, s = batched_soft_nms(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype),
                                   torch.zeros(0, dtype=torch.int64), backend=backend)
        assert keep.shape == (0,) and keep.dtype == torch.int64 and s.shape == (0,) and s.dtype == dtype
    keep, s = batched_soft_nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), torch.tensor([7]),
                               backend=backend)
    assert keep.tolist() == [0] and s.tolist() == pytest.approx([0.3])
    # a single box below the score threshold is dropped
    keep, s = batched_soft_nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), torch.tensor([7]),
                               score_threshold=0.5, backend=backend)
    assert keep.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_half_precision_inputs_are_computed_safely(dtype, backend):
    boxes, scores, idxs = random_detections(0, n=200)
    boxes = boxes * 5  # areas up to ~1e5 overflow fp16 (max 65504) if computed in the input dtype
    bh, sh = boxes.to(dtype), scores.to(dtype)
    keep, new_scores = batched_soft_nms(bh, sh, idxs, "linear", backend=backend)
    ref_keep, ref_scores = naive_soft_nms(bh.double(), sh.double(), idxs, "linear", 0.5, 0.3, 0.001)
    assert new_scores.dtype == dtype and keep.device == bh.device
    assert keep.tolist() == ref_keep
    assert torch.equal(new_scores, torch.tensor(ref_scores, dtype=torch.float64).to(dtype))


def test_bad_arguments_raise_value_error_naming_the_argument():
    boxes, scores, idxs = random_detections(0, n=10)
    with pytest.raises(ValueError, match="method"):
        batched_soft_nms(boxes, scores, idxs, method="cubic")
    with pytest.raises(ValueError, match="sigma"):
        batched_soft_nms(boxes, scores, idxs, method="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        batched_soft_nms(boxes, scores, idxs, sigma=-1.0)
    with pytest.raises(ValueError, match="iou_threshold"):
        batched_soft_nms(boxes, scores, idxs, iou_threshold=1.5)
    with pytest.raises(ValueError, match="score_threshold"):
        batched_soft_nms(boxes, scores, idxs, score_threshold=float("nan"))
    with pytest.raises(ValueError, match="mismatched lengths"):
        batched_soft_nms(boxes, scores[:-1], idxs)
    with pytest.raises(ValueError, match="mismatched lengths"):
        batched_soft_nms(boxes, scores, idxs[:-1])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        batched_soft_nms(boxes[:, :3], scores, idxs)
    bad = boxes.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="boxes contain non-finite"):
        batched_soft_nms(bad, scores, idxs)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="boxes contain non-finite"):
        batched_soft_nms(bad, scores, idxs, backend="torch")
    with pytest.raises(ValueError, match="idxs must be an integer"):
        batched_soft_nms(boxes, scores, idxs.float())
    with pytest.raises(ValueError, match="backend"):
        batched_soft_nms(boxes, scores, idxs, backend="cuda")
