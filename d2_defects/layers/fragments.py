"""Fragment decay: lower the score of a detection that lies inside a larger, higher-scoring detection of its class.

A long thin defect (a crack along a diagonal) is often detected twice: once whole, and once or more in parts
(fragments) whose boxes lie inside the whole one's box. Hard NMS or soft-NMS keep the fragments, because a
fragment's IoU with the whole box is small (its area is a small part of the whole box's). A fragment is a false
positive that outranks the true detections of other images. :func:`fragment_decay` multiplies the score of
every detection that has at least ``overlap`` of its own box area inside the box of a detection of the same
class that is larger (area) and scores higher; ``factor`` 0 removes them.

All pairs are judged on the input scores (a detection that is decayed still decays the fragments inside it), so
the result does not depend on the order of the inputs. The numpy twin shipped with exports is
``d2_defects.inference.deploy_postprocess.fragment_decay``.
"""
import torch

__all__ = ["fragment_decay"]


def fragment_decay(boxes, scores, classes, overlap=0.6, factor=0.5):
    """
    Args:
        boxes (Tensor): (N, 4) XYXY.
        scores (Tensor): (N,).
        classes (Tensor): (N,) integer ids; only boxes of the same id interact.
        overlap (float): in (0, 1]; a detection is a fragment when intersection / its own area >= overlap.
        factor (float): in [0, 1); fragments' scores are multiplied by it; 0 drops them.
    Returns:
        keep (Tensor): (M,) int64 indices into the inputs, sorted by new score (descending; equal scores: lower
            index first).
        new_scores (Tensor): (M,) their scores after the decay.
    """
    n = boxes.shape[0]
    fragment = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    b = boxes.double()
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    for c in torch.unique(classes):
        idx = torch.nonzero(classes == c).squeeze(1)
        if idx.numel() < 2:
            continue
        bc, ac, sc = b[idx], area[idx], scores[idx]
        lt = torch.maximum(bc[:, None, :2], bc[None, :, :2])
        rb = torch.minimum(bc[:, None, 2:], bc[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=2)  # (n_c, n_c): row i, column j
        inside = inter >= overlap * ac[:, None]
        inside &= ac[:, None] > 0
        inside &= ac[None, :] > ac[:, None]
        inside &= sc[None, :] > sc[:, None]
        fragment[idx] = inside.any(dim=1)
    new_scores = torch.where(fragment, scores * factor, scores)
    keep = torch.arange(n, device=boxes.device)
    if factor == 0:
        keep = keep[~fragment]
    # stable sort: equal scores keep the lower index first
    order = torch.sort(new_scores[keep], descending=True, stable=True).indices
    keep = keep[order]
    return keep, new_scores[keep]
