"""Batched soft-NMS (Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code", 2017).

``batched_soft_nms`` has two implementations behind one function, selected by the device of the inputs:

- CPU: a loop JIT-compiled with numba (compiled for one signature on the first call and cached on disk, so
  later processes load it instead of compiling; no compilation ever happens per input shape or dtype);
- CUDA (or ``backend="torch"`` anywhere): a vectorised torch version that finalises the boxes in rounds.
  In each round every live box that beats all the live boxes it interacts with (same id, IoU above the
  interaction threshold) is final: no other box can still decay it, and such boxes never interact with
  each other, so they can all be finalised at once and the result equals the sequential algorithm's.
  All ids run together as a padded (groups, M) batch. There is one host synchronisation per round, never
  one per box.

Both paths compute in float64 (whatever the input dtype, so fp16/bf16 inputs are safe) with the same IoU
formula and the same tie-breaking (higher score first, then lower input index), and keep the same boxes in
the same order. Their float64 scores can differ in the last bits (the torch path multiplies the decays a box
receives in one round as one product, the numba path one at a time): bit-identical results for
fp32/fp16/bf16 inputs (rounded from float64), float64 inputs within 1e-15.
"""
import functools
import math

import numba
import numpy as np
import torch

__all__ = ["batched_soft_nms", "SOFT_NMS_METHODS"]

SOFT_NMS_METHODS = {"linear": 0, "gaussian": 1, "hard": 2}
_BACKENDS = (None, "numba", "torch")


def _check_args(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, backend):
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"batched_soft_nms: unknown method {method!r}, expected one of {sorted(SOFT_NMS_METHODS)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"batched_soft_nms: sigma must be a finite number > 0, got {sigma!r}")
    if not (isinstance(iou_threshold, (int, float)) and 0.0 <= iou_threshold <= 1.0):
        raise ValueError(f"batched_soft_nms: iou_threshold must be in [0, 1], got {iou_threshold!r}")
    if not (isinstance(score_threshold, (int, float)) and math.isfinite(score_threshold)):
        raise ValueError(f"batched_soft_nms: score_threshold must be a finite number, got {score_threshold!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"batched_soft_nms: unknown backend {backend!r}, expected one of {_BACKENDS}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"batched_soft_nms: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or idxs.dim() != 1 or not (len(boxes) == len(scores) == len(idxs)):
        raise ValueError(
            "batched_soft_nms: mismatched lengths: boxes "
            f"{tuple(boxes.shape)}, scores {tuple(scores.shape)}, idxs {tuple(idxs.shape)} "
            "(expected (N, 4), (N,), (N,))"
        )
    if not (boxes.device == scores.device == idxs.device):
        raise ValueError(
            f"batched_soft_nms: boxes, scores and idxs are on different devices "
            f"({boxes.device}, {scores.device}, {idxs.device})"
        )
    if idxs.is_floating_point() or idxs.is_complex():
        raise ValueError(f"batched_soft_nms: idxs must be an integer tensor, got {idxs.dtype}")
    if not boxes.is_floating_point() or not scores.is_floating_point():
        raise ValueError(
            f"batched_soft_nms: boxes and scores must be floating point, got {boxes.dtype}, {scores.dtype}"
        )
    # One synchronisation per call (not per box).
    if len(boxes) and not bool(torch.isfinite(boxes).all()):
        raise ValueError("batched_soft_nms: boxes contain non-finite values (nan or inf)")
    if len(scores) and not bool(torch.isfinite(scores).all()):
        raise ValueError("batched_soft_nms: scores contain non-finite values (nan or inf)")


def batched_soft_nms(
    boxes, scores, idxs, method="linear", sigma=0.5, iou_threshold=0.3, score_threshold=0.001, *, backend=None
):
    """
    Soft-NMS applied independently to each group of boxes that share an id.

    Args:
        boxes (Tensor): (N, 4) boxes in XYXY absolute coordinates.
        scores (Tensor): (N,) scores.
        idxs (Tensor): (N,) integer ids (class, or class x image); boxes with different ids never interact.
        method (str): "linear": score * (1 - IoU) where IoU > iou_threshold; "gaussian":
            score * exp(-IoU^2 / sigma) for all pairs; "hard": classic NMS at iou_threshold (same result as
            ``torchvision.ops.batched_nms`` on the boxes whose score is >= score_threshold).
        sigma (float): > 0, the gaussian's parameter (only used by "gaussian").
        iou_threshold (float): in [0, 1], IoU above which "linear" decays and "hard" suppresses.
        score_threshold (float): boxes whose (decayed) score falls below it are dropped (and stop decaying
            others).
        backend (str or None): None picks "numba" for CPU inputs and "torch" otherwise; "torch" runs the
            vectorised version on any device (it is the CUDA path).

    Returns:
        keep (Tensor): (M,) int64 indices into the inputs, sorted by decayed score (descending; equal
            scores: lower index first).
        new_scores (Tensor): (M,) the decayed scores of ``keep``, dtype of ``scores``.

    IoU is computed as ``torchvision.ops.box_iou`` (no +1; 0 for two empty boxes).
    Raises ValueError naming the bad argument (unknown method, sigma <= 0, mismatched lengths, non-finite
    boxes or scores, ...).
    """
    _check_args(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, backend)
    if backend is None:
        backend = "numba" if boxes.device.type == "cpu" else "torch"
    if backend == "numba" and boxes.device.type != "cpu":
        raise ValueError(f"batched_soft_nms: backend='numba' needs CPU tensors, got {boxes.device}")
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)
    if backend == "numba":
        keep, new_scores = _numba_kernel()(
            boxes.detach().to(torch.float64).contiguous().numpy(),
            scores.detach().to(torch.float64).contiguous().numpy(),
            idxs.detach().to(torch.int64).contiguous().numpy(),
            SOFT_NMS_METHODS[method], float(sigma), float(iou_threshold), float(score_threshold),
        )
        keep, new_scores = torch.from_numpy(keep), torch.from_numpy(new_scores)
    else:
        keep, new_scores = _soft_nms_torch(
            boxes.detach().to(torch.float64), scores.detach().to(torch.float64), idxs.detach().to(torch.int64),
            method, float(sigma), float(iou_threshold), float(score_threshold),
        )
    return keep, new_scores.to(scores.dtype)


# ---------------------------------------------------------------------------------------------------------
# CPU: numba. Compiled for one signature on first use (not at import: loading the cached code takes ~0.4 s)
# and cached on disk (cache=True), so only the very first call on a machine compiles.
# ---------------------------------------------------------------------------------------------------------
_NUMBA_SIGNATURE = (
    "Tuple((int64[:], float64[:]))(float64[:, ::1], float64[::1], int64[::1], int64, float64, float64, float64)"
)


@functools.lru_cache(maxsize=None)
def _numba_kernel():
    return numba.njit(_NUMBA_SIGNATURE, cache=True, nogil=True)(_soft_nms_loop)


@numba.njit(inline="always", cache=True)  # lazy: compiled into the kernel that calls it
def _iou_one(x1, y1, x2, y2, a, xi1, yi1, xi2, yi2, ai):
    # same arithmetic as _pairwise_iou (and torchvision's box_iou); ternaries instead of min/max: faster in numba
    w = (x2 if x2 < xi2 else xi2) - (x1 if x1 > xi1 else xi1)
    h = (y2 if y2 < yi2 else yi2) - (y1 if y1 > yi1 else yi1)
    inter = (w if w > 0.0 else 0.0) * (h if h > 0.0 else 0.0)
    union = ai + a - inter
    return inter / union if union > 0 else 0.0


def _soft_nms_loop(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    """Sequential soft-NMS, one id group at a time, on compact per-group arrays (live boxes at the front)."""
    n = boxes.shape[0]
    order = np.argsort(idxs, kind="mergesort")  # boxes grouped by id
    # the live boxes of the current group, one array per field (swap-remove keeps them contiguous)
    X1, Y1, X2, Y2, A, S = np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    ids = np.empty(n, dtype=np.int64)
    keep, final = np.empty(n, dtype=np.int64), np.empty(n)
    nk = 0
    start = 0
    while start < n:
        end = start + 1
        while end < n and idxs[order[end]] == idxs[order[start]]:
            end += 1
        cnt = 0
        for k in range(start, end):
            j = order[k]
            if scores[j] >= score_threshold:
                X1[cnt], Y1[cnt], X2[cnt], Y2[cnt] = boxes[j, 0], boxes[j, 1], boxes[j, 2], boxes[j, 3]
                A[cnt] = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
                S[cnt], ids[cnt] = scores[j], j
                cnt += 1
        b = 0  # best live box: highest score, then lowest input index
        for t in range(1, cnt):
            if S[t] > S[b] or (S[t] == S[b] and ids[t] < ids[b]):
                b = t
        while cnt > 0:
            keep[nk], final[nk] = ids[b], S[b]
            nk += 1
            xi1, yi1, xi2, yi2, ai = X1[b], Y1[b], X2[b], Y2[b], A[b]
            cnt -= 1
            X1[b], Y1[b], X2[b], Y2[b], A[b], S[b], ids[b] = (
                X1[cnt], Y1[cnt], X2[cnt], Y2[cnt], A[cnt], S[cnt], ids[cnt]
            )
            # decay every live box of the group (one loop per method: tight, branch-light loops)
            if method == 0:
                for t in range(cnt):
                    iou = _iou_one(X1[t], Y1[t], X2[t], Y2[t], A[t], xi1, yi1, xi2, yi2, ai)
                    S[t] *= (1.0 - iou) if iou > iou_threshold else 1.0
            elif method == 1:
                for t in range(cnt):
                    iou = _iou_one(X1[t], Y1[t], X2[t], Y2[t], A[t], xi1, yi1, xi2, yi2, ai)
                    if iou > 0:
                        S[t] *= math.exp(-(iou * iou) / sigma)
            else:
                for t in range(cnt):
                    iou = _iou_one(X1[t], Y1[t], X2[t], Y2[t], A[t], xi1, yi1, xi2, yi2, ai)
                    if iou > iou_threshold:
                        S[t] = -np.inf  # suppressed (score_threshold is finite)
            # prune below score_threshold and find the next best in the same pass
            t = 0
            b = -1
            while t < cnt:
                if S[t] < score_threshold:
                    cnt -= 1
                    X1[t], Y1[t], X2[t], Y2[t], A[t], S[t], ids[t] = (
                        X1[cnt], Y1[cnt], X2[cnt], Y2[cnt], A[cnt], S[cnt], ids[cnt]
                    )
                else:
                    if b < 0 or S[t] > S[b] or (S[t] == S[b] and ids[t] < ids[b]):
                        b = t
                    t += 1
        start = end
    keep, final = keep[:nk], final[:nk]
    o = np.argsort(keep)
    keep, final = keep[o], final[o]
    o = np.argsort(-final, kind="mergesort")  # stable: equal scores stay in index order
    return keep[o], final[o]


# ---------------------------------------------------------------------------------------------------------
# Vectorised torch version (CUDA path): finalise in rounds, one host synchronisation per round.
# ---------------------------------------------------------------------------------------------------------
def _pairwise_iou(b):
    """(..., m, 4) -> (..., m, m) IoU with the same arithmetic as the numba kernel (and torchvision's box_iou)."""
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lo, hi = b[..., :, None, :], b[..., None, :, :]
    w = torch.minimum(lo[..., 2], hi[..., 2]) - torch.maximum(lo[..., 0], hi[..., 0])
    h = torch.minimum(lo[..., 3], hi[..., 3]) - torch.maximum(lo[..., 1], hi[..., 1])
    inter = w.clamp(min=0) * h.clamp(min=0)
    union = area[..., :, None] + area[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(b.dtype).tiny), 0.0)


def _soft_nms_torch(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    # Groups (ids) are laid out as a padded (C, M) batch, so that all groups run in the same rounds and the
    # pairwise matrices are (C, M, M) instead of (N, N).
    dev = boxes.device
    order = torch.sort(idxs, stable=True).indices  # grouped by id, input order within a group
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    num_groups, m = len(counts), int(counts.max())  # one synchronisation
    group = torch.repeat_interleave(torch.arange(num_groups, device=dev), counts)
    pos = torch.arange(len(order), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
    index = torch.full((num_groups, m), -1, dtype=torch.int64, device=dev)
    index[group, pos] = order
    valid = index >= 0
    b = boxes.new_zeros(num_groups, m, 4)
    b[group, pos] = boxes[order]
    s = scores.new_full((num_groups, m), -math.inf)
    s[group, pos] = scores[order]

    iou = _pairwise_iou(b)
    # nb[g, i, j]: j can decay i (and i can decay j)
    nb = (iou > (0.0 if method == "gaussian" else iou_threshold)) & valid[:, None, :] & valid[:, :, None]
    nb &= ~torch.eye(m, dtype=torch.bool, device=dev)
    if method == "linear":
        weight = torch.where(nb, 1.0 - iou, 1.0)
    elif method == "gaussian":
        weight = torch.where(nb, torch.exp(-(iou * iou) / sigma), 1.0)
    del iou
    earlier = torch.ones(m, m, dtype=torch.bool, device=dev).tril_(-1)  # [i, j]: j has the lower input index

    live = valid & (s >= score_threshold)
    kept = torch.zeros_like(live)
    while bool(live.any()):  # one synchronisation per round
        si, sj = s[:, :, None], s[:, None, :]
        beaten = nb & live[:, None, :] & ((sj > si) | ((sj == si) & earlier))
        # final: beats every live box it interacts with (so nothing can decay it any more)
        ready = live & ~beaten.any(dim=2)
        kept |= ready
        hit = nb & ready[:, None, :]  # decays applied by the boxes finalised in this round
        live &= ~ready
        if method == "hard":
            live &= ~hit.any(dim=2)
        else:
            s = torch.where(live, s * torch.where(hit, weight, 1.0).prod(dim=2), s)
            live &= s >= score_threshold
    keep, final = index[kept], s[kept]
    o = torch.sort(keep).indices
    keep, final = keep[o], final[o]
    o = torch.sort(-final, stable=True).indices  # equal scores stay in index order
    return keep[o], final[o]
