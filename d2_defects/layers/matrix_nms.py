"""Matrix NMS (SOLOv2, Wang et al., arXiv 2003.10152, section 3.3): every mask's score decays at once, by its
overlap with the higher-scoring masks of its class, computed as one IoU matrix instead of a sequential loop."""
import torch

__all__ = ["MATRIX_NMS_KERNELS", "matrix_nms"]

MATRIX_NMS_KERNELS = ("gaussian", "linear")


def matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """
    Decayed scores of ``masks`` (Matrix NMS).

    For a mask j, each higher-scoring mask i of the same class decays it by f(IoU(i, j)) / f(c_i), where c_i is
    the largest IoU of mask i with a mask of its class scoring above it (how much i was itself suppressed);
    mask j keeps the smallest of these factors, and never more than 1. f is ``exp(-sigma * IoU**2)``
    (``"gaussian"``) or ``1 - IoU`` (``"linear"``).

    Args:
        masks (Tensor): (N, H, W) bool or {0, 1}.
        labels (Tensor): (N,) class of each mask; masks of different classes do not decay each other.
        scores (Tensor): (N,) scores.
        kernel (str): one of :data:`MATRIX_NMS_KERNELS`; sigma (float): the gaussian's sigma.
    Returns:
        Tensor: (N,) the decayed scores, in the input order.
    """
    n = len(scores)
    if n == 0:
        return scores.clone()
    if kernel not in MATRIX_NMS_KERNELS:
        raise ValueError(f"matrix_nms: kernel must be one of {MATRIX_NMS_KERNELS}, got {kernel!r}")
    order = torch.argsort(scores, descending=True)
    flat = masks[order].reshape(n, -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)  # [i, j]: i scores above j
    lab = labels[order]
    iou = iou * (lab[:, None] == lab[None, :]).to(iou.dtype)
    comp = iou.max(dim=0).values[:, None]  # c_i, as a column: row i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou ** 2 - comp ** 2))
    else:
        decay = (1 - iou) / (1 - comp).clamp(min=1e-6)
    # row 0 (the best mask, c_0 = 0) gives f(IoU(0, j)) <= 1, or 1 for another class: the minimum is <= 1
    factor = decay.min(dim=0).values
    out = torch.empty_like(scores)
    out[order] = scores[order] * factor.to(scores.dtype)
    return out
