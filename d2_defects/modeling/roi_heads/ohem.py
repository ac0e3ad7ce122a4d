"""Online hard example mining (OHEM) for the box head: ``MODEL.ROI_HEADS.SAMPLER: "ohem"``.

Instead of sampling ``BATCH_SIZE_PER_IMAGE`` proposals at random, every labelled proposal goes through the
box head once without gradients; per image, the foreground proposals with the highest loss (at most
``POSITIVE_FRACTION`` of the batch) and then the background proposals with the highest loss fill the batch.
The box head is then trained on that selection only, as with the random sampler.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import cat, ciou_loss, diou_loss
from fvcore.nn import giou_loss, smooth_l1_loss

__all__ = ["SAMPLERS", "per_proposal_losses", "select_hard_examples"]

SAMPLERS = ("random", "ohem")


def per_proposal_losses(predictor, predictions, proposals):
    """
    Loss of each proposal alone, as ``FastRCNNOutputLayers.losses`` gives it for a batch of one proposal
    (classification + weighted box regression; foreground proposals only get a box term).

    Args:
        predictor (FastRCNNOutputLayers): the box predictor that made ``predictions``.
        predictions (tuple): its ``forward`` output; ``(scores (R, K+1), deltas (R, 4 or K*4), ...)``.
        proposals (list[Instances]): with ``proposal_boxes``, ``gt_classes`` and (if any fg) ``gt_boxes``.
    Returns:
        Tensor: (R,) losses, in the order of ``proposals``.
    """
    scores, deltas = predictions[:2]
    gt_classes = cat([p.gt_classes for p in proposals], dim=0)
    num_classes = predictor.num_classes
    if predictor.use_sigmoid_ce:
        target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(scores.dtype)
        loss = F.binary_cross_entropy_with_logits(scores[:, :-1], target, reduction="none").sum(1)
    else:
        loss = F.cross_entropy(scores, gt_classes, reduction="none")
    loss = loss * predictor.loss_weight.get("loss_cls", 1.0)

    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes)).squeeze(1)
    if fg.numel() == 0:
        return loss
    proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)[fg]
    gt_boxes = _gather_gt_boxes(proposals)[fg]
    box_dim = proposal_boxes.shape[1]
    if deltas.shape[1] == box_dim:
        fg_deltas = deltas[fg]
    else:
        fg_deltas = deltas.view(-1, num_classes, box_dim)[fg, gt_classes[fg]]
    b2b = predictor.box2box_transform
    kind = predictor.box_reg_loss_type
    if kind == "smooth_l1":
        reg = smooth_l1_loss(fg_deltas, b2b.get_deltas(proposal_boxes, gt_boxes), predictor.smooth_l1_beta,
                             reduction="none").sum(1)
    else:
        fn = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}[kind]
        reg = fn(b2b.apply_deltas(fg_deltas, proposal_boxes), gt_boxes, reduction="none")
    loss = loss.clone()
    loss[fg] += reg * predictor.loss_weight.get("loss_box_reg", 1.0)
    return loss


def _gather_gt_boxes(proposals):
    """gt boxes of every proposal (zeros where the image has no ``gt_boxes``), (R, 4)."""
    return cat([p.gt_boxes.tensor if p.has("gt_boxes") else p.proposal_boxes.tensor.new_zeros((len(p), 4))
                for p in proposals], dim=0)


def select_hard_examples(gt_classes, losses, batch_size_per_image, positive_fraction, num_classes):
    """
    Indices of the proposals of one image to train on: the highest-loss foreground proposals (at most
    ``int(batch_size_per_image * positive_fraction)``), then the highest-loss background proposals until
    ``batch_size_per_image`` (the same counts as Detectron2's ``subsample_labels``). Ignored proposals
    (label -1) are never selected.

    Args:
        gt_classes (Tensor): (R,) labels in [0, K] or -1; K is background.
        losses (Tensor): (R,) per-proposal losses.
    Returns:
        Tensor: (M,) int64 indices, foreground first.
    """
    fg = torch.nonzero((gt_classes >= 0) & (gt_classes != num_classes)).squeeze(1)
    bg = torch.nonzero(gt_classes == num_classes).squeeze(1)
    num_fg = min(int(batch_size_per_image * positive_fraction), fg.numel())
    num_bg = min(batch_size_per_image - num_fg, bg.numel())
    fg = fg[losses[fg].topk(num_fg).indices]
    bg = bg[losses[bg].topk(num_bg).indices]
    return torch.cat([fg, bg])


class OHEMSamplerMixin:
    """
    Sampling for ROI heads that have ``self.sampler`` ("random" | "ohem"). With "ohem",
    ``_sample_proposals`` keeps every labelled proposal and :meth:`_select_hard_examples` (called by the head's
    ``_forward_box`` before the box loss) keeps the top-loss ones; with "random" nothing changes.
    """

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        if self.sampler != "ohem":
            return super()._sample_proposals(matched_idxs, matched_labels, gt_classes)
        # Same labelling as ROIHeads._sample_proposals (detectron2 a59f056), without the random subsampling.
        if gt_classes.numel() > 0:
            gt_classes = gt_classes[matched_idxs]
            gt_classes[matched_labels == 0] = self.num_classes
            gt_classes[matched_labels == -1] = -1
        else:
            gt_classes = torch.zeros_like(matched_idxs) + self.num_classes
        keep = torch.nonzero(gt_classes >= 0).squeeze(1)
        return keep, gt_classes[keep]

    @torch.no_grad()
    def _select_hard_examples(self, features, proposals, box_head, box_predictor):
        """
        Args:
            features (list[Tensor]): the box head's input feature maps.
            proposals (list[Instances]): labelled proposals (all of them, see ``_sample_proposals``).
            box_head, box_predictor: the (first-stage) box head and predictor that rank the proposals.
        Returns:
            list[Instances]: per image, the selected proposals.
        """
        box_features = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        predictions = box_predictor(box_head(box_features))
        losses = per_proposal_losses(box_predictor, predictions, proposals).split([len(p) for p in proposals])
        return [
            p[select_hard_examples(p.gt_classes, l, self.batch_size_per_image, self.positive_fraction,
                                   self.num_classes)]
            for p, l in zip(proposals, losses)
        ]
