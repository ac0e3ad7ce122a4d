"""Matching detections to ground truth and average precision, vectorised with numpy.

The matching follows pycocotools' ``COCOeval.evaluateImg`` (cocodataset/cocoapi, area range "all"):
per image and class, detections in decreasing score order (at most ``max_dets``) each take the unmatched
ground-truth box of highest IoU (>= the threshold; ties go to the later box), preferring non-crowd
boxes; detections matched to crowd boxes are ignored. Crowd IoU is intersection / detection area.
Instead of one Python loop per (image, class, threshold, detection), all (image, class) groups advance
together one detection rank at a time, for all thresholds at once.
"""
import numpy as np

__all__ = ["box_iou_xywh", "match_detections", "ap_from_flags", "accumulate", "COCO_RECALL_POINTS"]

# pycocotools' recall thresholds: 0, 0.01, ..., 1.
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou_xywh(det, gt, crowd):
    """
    IoU of detections against ground-truth boxes, COCO conventions (no +1).

    Args:
        det (ndarray): (..., 4) XYWH.
        gt (ndarray): (..., 4) XYWH, broadcastable against ``det``.
        crowd (ndarray): bool, broadcastable; crowd boxes use intersection / detection area.
    Returns:
        ndarray: broadcast shape without the last axis.
    """
    iw = np.minimum(det[..., 0] + det[..., 2], gt[..., 0] + gt[..., 2]) - np.maximum(det[..., 0], gt[..., 0])
    ih = np.minimum(det[..., 1] + det[..., 3], gt[..., 1] + gt[..., 3]) - np.maximum(det[..., 1], gt[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    da = det[..., 2] * det[..., 3]
    union = np.where(crowd, da, da + gt[..., 2] * gt[..., 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _group_ranks(keys):
    """Rank of each element inside its run of equal ``keys`` (keys sorted)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[True, keys[1:] != keys[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - first


def match_detections(gt, dt, num_classes, rule, max_dets=100):
    """
    Greedy score-ordered matching of detections to ground truth, per image and class.

    Args:
        gt (dict): ``img`` (G,) int image index, ``cls`` (G,) int class, ``boxes`` (G, 4) XYWH,
            ``crowd`` (G,) bool.
        dt (dict): ``img`` (D,), ``cls`` (D,), ``boxes`` (D, 4) XYWH, ``scores`` (D,).
        num_classes (int): K.
        rule (IouRule): thresholds (T of them).
        max_dets (int): detections kept per image and class (highest scores), like COCO's maxDets.

    Returns:
        dict: ``keep`` (N,) indices into ``dt`` of the detections kept, in (image, class, score) order;
        ``rank`` (N,) their rank inside (image, class); ``gt_index`` (T, N) index into ``gt`` of the
        matched box or -1; ``ignored`` (T, N) bool, matched to a crowd box.
    """
    T = rule.num_thresholds
    gkey = gt["img"].astype(np.int64) * num_classes + gt["cls"]
    g_order = np.lexsort((gt["crowd"], gkey))  # per group: non-crowd first, then original order
    gk = gkey[g_order]
    dkey = dt["img"].astype(np.int64) * num_classes + dt["cls"]
    d_order = np.lexsort((-dt["scores"], dkey))  # stable: equal scores keep their input order
    rank = _group_ranks(dkey[d_order])
    sel = rank < max_dets
    keep, rank = d_order[sel], rank[sel]
    dk = dkey[keep]
    n = len(keep)
    gt_index = np.full((T, n), -1, dtype=np.int64)
    ignored = np.zeros((T, n), dtype=bool)
    if n == 0 or len(gk) == 0:
        return {"keep": keep, "rank": rank, "gt_index": gt_index, "ignored": ignored}

    ukeys, gstart, gcount = np.unique(gk, return_index=True, return_counts=True)
    thr_all = np.minimum(rule.per_gt(gt["boxes"]), 1 - 1e-10)  # (T, G), COCO's clamp
    pos = np.minimum(np.searchsorted(ukeys, dk), len(ukeys) - 1)
    m_idx = np.nonzero(ukeys[pos] == dk)[0]  # kept detections whose (image, class) has ground truth
    grp = pos[m_idx]
    # groups are padded to their bucket's largest box count; power-of-two buckets bound the padding
    # (and memory) when a few images hold many boxes
    bucket = np.ceil(np.log2(gcount)).astype(np.int64)
    for b in np.unique(bucket[grp]):
        sel = np.nonzero(bucket[grp] == b)[0]
        groups, local = np.unique(grp[sel], return_inverse=True)
        _match_padded(gt, dt, keep, rank, m_idx[sel], local.reshape(-1), g_order, gstart[groups],
                      gcount[groups], thr_all, gt_index, ignored)
    return {"keep": keep, "rank": rank, "gt_index": gt_index, "ignored": ignored}


def _match_padded(gt, dt, keep, rank, m_idx, grp, g_order, gstart, gcount, thr_all, gt_index, ignored):
    """
    Match the kept detections ``keep[m_idx]`` (their group: ``grp``, index into ``gstart``/``gcount``)
    with each group's ground truth padded to the largest group; fills ``gt_index``/``ignored`` in place.
    """
    T = thr_all.shape[0]
    gmax = int(gcount.max())
    slot = np.arange(gmax)
    valid = slot[None, :] < gcount[:, None]  # (U, Gmax)
    pad_idx = np.where(valid, g_order[np.minimum(gstart[:, None] + slot[None, :], len(g_order) - 1)], -1)
    crowd_pad = np.where(valid, gt["crowd"][np.maximum(pad_idx, 0)], False)
    thr_pad = np.full((len(gstart), T, gmax), np.inf)
    thr_pad.transpose(0, 2, 1)[valid] = thr_all[:, pad_idx[valid]].T

    gboxes = gt["boxes"][np.maximum(pad_idx[grp], 0)]  # (M, Gmax, 4)
    ious = box_iou_xywh(dt["boxes"][keep[m_idx]][:, None, :], gboxes, crowd_pad[grp])
    ious = np.where(valid[grp], ious, -1.0)

    matched = np.zeros((len(gstart), T, gmax), dtype=bool)
    m_rank = rank[m_idx]
    for r in range(int(m_rank.max()) + 1 if len(m_rank) else 0):
        a = np.nonzero(m_rank == r)[0]  # at most one detection per group at each rank
        if len(a) == 0:
            continue
        u = grp[a]
        iou = ious[a][:, None, :]  # (A, 1, Gmax)
        crowd = crowd_pad[u][:, None, :]
        cand = (iou >= thr_pad[u]) & ~(matched[u] & ~crowd)
        regular = cand & ~crowd
        use = np.where(regular.any(-1, keepdims=True), regular, cand)
        score = np.where(use, iou, -2.0)[..., ::-1]
        j = gmax - 1 - score.argmax(-1)  # (A, T): highest IoU, ties to the later box
        ok = use.any(-1)
        ai, ti = np.nonzero(ok)
        jj = j[ai, ti]
        matched[u[ai], ti, jj] = True
        cols = m_idx[a[ai]]
        gt_index[ti, cols] = pad_idx[u[ai], jj]
        ignored[ti, cols] = crowd_pad[u[ai], jj]


def ap_from_flags(tp, fp, num_gt, method="coco"):
    """
    Average precision from score-sorted true/false-positive flags.

    Args:
        tp (ndarray): (T, N) bool, detections sorted by decreasing score.
        fp (ndarray): (T, N) bool (a detection that is neither is ignored).
        num_gt (int): number of (non-crowd) ground-truth boxes.
        method (str): "coco" (101-point interpolated, like COCOeval) or "voc" (all-point area under
            the monotone precision envelope, VOC2010+).
    Returns:
        ndarray: (T,) AP in [0, 1]; nan if ``num_gt == 0``.
        ndarray: (T,) final recall.
    """
    T = tp.shape[0]
    if num_gt == 0:
        return np.full(T, np.nan), np.full(T, np.nan)
    n = tp.shape[1]
    if n == 0:
        return np.zeros(T), np.zeros(T)
    tpc = np.cumsum(tp, axis=1, dtype=np.float64)
    fpc = np.cumsum(fp, axis=1, dtype=np.float64)
    rc = tpc / num_gt
    pr = tpc / (tpc + fpc + np.spacing(1))
    env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    ap = np.zeros(T)
    for t in range(T):
        if method == "coco":
            inds = np.searchsorted(rc[t], COCO_RECALL_POINTS, side="left")
            ap[t] = np.where(inds < n, env[t, np.minimum(inds, n - 1)], 0.0).mean()
        else:
            mrec = np.r_[0.0, rc[t]]
            ap[t] = np.sum(np.diff(mrec) * env[t])
    return ap, rc[:, -1]


def accumulate(gt, dt, match, num_classes, method="coco"):
    """
    Per-class AP from a :func:`match_detections` result.

    Returns:
        dict with ``ap`` (K, T) in [0, 1] (nan: no ground truth), ``recall`` (K, T), ``num_gt`` (K,),
        ``num_det`` (K,), and ``curves``: per class a dict with ``scores`` (N,) sorted decreasing and
        ``tp``/``fp`` (T, N) flags, ``num_gt`` — enough to redraw PR curves or re-score thresholds.
    """
    T = match["gt_index"].shape[0]
    keep = match["keep"]
    cls = dt["cls"][keep]
    scores = dt["scores"][keep]
    img = dt["img"][keep]
    num_gt = np.bincount(gt["cls"][~gt["crowd"]], minlength=num_classes)[:num_classes]
    ap = np.full((num_classes, T), np.nan)
    recall = np.full((num_classes, T), np.nan)
    num_det = np.bincount(cls, minlength=num_classes)[:num_classes]
    curves = []
    for k in range(num_classes):
        idx = np.nonzero(cls == k)[0]
        # COCOeval concatenates images in id order, then sorts by score with a stable sort
        idx = idx[np.lexsort((match["rank"][idx], img[idx], -scores[idx]))]
        g = match["gt_index"][:, idx]
        ig = match["ignored"][:, idx]
        tp = (g >= 0) & ~ig
        fp = (g < 0) & ~ig
        ap[k], recall[k] = ap_from_flags(tp, fp, int(num_gt[k]), method)
        curves.append({"scores": scores[idx], "tp": tp, "fp": fp, "num_gt": int(num_gt[k]),
                       "det_index": keep[idx]})
    return {"ap": ap, "recall": recall, "num_gt": num_gt, "num_det": num_det, "curves": curves}
