"""R-CNN with an image-level defect/normal classifier (DefectNet-style).

The competitions score an image-level decision (ACC: does the image contain a defect?) next to box AP.
:class:`DefectRCNN` adds a small classifier on globally pooled backbone features, trained with BCE
(``loss_image``; images without annotations are the negatives), and returns its probability per image as
``defect_score`` next to ``instances``. With ``MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD > 0`` images scored below
the threshold return no boxes without running the RPN and ROI heads, which saves most of the head time on
the many normal images of a production line.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F
from ...utils.errors import ConfigError

__all__ = ["DefectRCNN", "ImageDefectHead"]

logger = logging.getLogger(__name__)


class ImageDefectHead(nn.Module):
    """
    Global average + max pooling of each input feature map, concatenated, then Linear-ReLU-Linear to one logit.
    Max pooling keeps the signal of defects that cover only a few pixels.
    """

    def __init__(self, in_channels: List[int], hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * sum(in_channels), hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: List[torch.Tensor]):
        """features: list of (N, C_i, H_i, W_i) -> (N,) logits."""
        pooled = [torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1) for f in features]
        return self.fc2(F.relu(self.fc1(torch.cat(pooled, dim=1)))).squeeze(1)


@META_ARCH_REGISTRY.register()
class DefectRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` + :class:`ImageDefectHead`; outputs ``{"instances", "defect_score"}`` per image."""

    @configurable
    def __init__(
        self,
        *,
        image_head: nn.Module,
        image_in_features: List[str],
        image_loss_weight: float = 1.0,
        skip_normal_threshold: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            image_head: maps the list of ``image_in_features`` maps to (N,) defect logits.
            image_in_features: backbone outputs fed to ``image_head``.
            image_loss_weight: weight of ``loss_image``.
            skip_normal_threshold: at inference images with ``defect_score`` below it skip the RPN/ROI heads
                and get no boxes; 0 disables skipping.
            kwargs: arguments of :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        self.image_head = image_head
        self.image_in_features = list(image_in_features)
        self.image_loss_weight = image_loss_weight
        self.skip_normal_threshold = skip_normal_threshold

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.MODEL.DEFECT_RCNN
        shapes = ret["backbone"].output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing or not c.IN_FEATURES:
            raise ConfigError(
                f"MODEL.DEFECT_RCNN.IN_FEATURES: {missing or '[]'} not in the backbone outputs {sorted(shapes)}"
            )
        if not 0.0 <= c.SKIP_NORMAL_THRESHOLD <= 1.0:
            raise ConfigError(f"MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD must be in [0, 1], got {c.SKIP_NORMAL_THRESHOLD}")
        if c.HIDDEN_DIM < 1:
            raise ConfigError(f"MODEL.DEFECT_RCNN.HIDDEN_DIM must be >= 1, got {c.HIDDEN_DIM}")
        if ret["proposal_generator"] is None:
            raise ConfigError("DefectRCNN needs a proposal generator (MODEL.PROPOSAL_GENERATOR.NAME)")
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            logger.warning(
                "DefectRCNN: DATALOADER.FILTER_EMPTY_ANNOTATIONS is True, so the image head sees no normal image "
                "(negative) in training; set it to False"
            )
        ret.update(
            image_head=ImageDefectHead([shapes[f].channels for f in c.IN_FEATURES], c.HIDDEN_DIM),
            image_in_features=list(c.IN_FEATURES),
            image_loss_weight=c.LOSS_WEIGHT,
            skip_normal_threshold=c.SKIP_NORMAL_THRESHOLD,
        )
        return ret

    def image_logits(self, features: Dict[str, torch.Tensor]):
        """(N,) defect logits from the backbone outputs."""
        return self.image_head([features[f] for f in self.image_in_features])

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        # Training branch of GeneralizedRCNN.forward (detectron2 a59f056) restated, because the image head
        # needs the backbone features that upstream keeps local; plus loss_image.
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)

        logits = self.image_logits(features)
        is_defect = torch.tensor([float(len(x) > 0) for x in gt_instances], device=logits.device)
        losses = {"loss_image": self.image_loss_weight * F.binary_cross_entropy_with_logits(logits, is_defect)}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        return losses

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """
        Like :meth:`GeneralizedRCNN.inference`, with ``defect_score`` (float; a 0-dim tensor while tracing) in
        each output dict (when ``do_postprocess``) and the RPN/ROI heads run only on the images scored at or
        above ``skip_normal_threshold`` (tracing is refused when it is > 0).
        """
        assert not self.training
        tracing = torch.jit.is_tracing()
        if tracing and self.skip_normal_threshold > 0:
            # which images skip the heads depends on the data; a trace would fix the choice of the sample image
            raise ConfigError(
                f"MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD={self.skip_normal_threshold}: a model that skips the "
                "heads cannot be traced; export with 0 and apply the threshold to the exported defect_score"
            )
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        defect_scores = self.image_logits(features).sigmoid()
        if self.skip_normal_threshold > 0:
            run = torch.nonzero(defect_scores >= self.skip_normal_threshold).squeeze(1).tolist()
        else:  # scores are >= 0: every image runs the heads
            run = list(range(len(batched_inputs)))

        results: List[Optional[Instances]] = [None] * len(batched_inputs)
        if run:
            if len(run) < len(batched_inputs):
                images = ImageList(images.tensor[run], [images.image_sizes[i] for i in run])
                features = {k: v[run] for k, v in features.items()}
            if detected_instances is None:
                proposals, _ = self.proposal_generator(images, features, None)
                kept, _ = self.roi_heads(images, features, proposals, None)
            else:
                given = [detected_instances[i].to(self.device) for i in run]
                kept = self.roi_heads.forward_with_given_boxes(features, given)
            for i, r in zip(run, kept):
                results[i] = r
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        for i, r in enumerate(results):
            if r is None:
                results[i] = self._no_detections(image_sizes[i])

        if not do_postprocess:
            return results
        processed = GeneralizedRCNN._postprocess(results, batched_inputs, image_sizes)
        for i, out in enumerate(processed):
            # a float for users; a 0-dim tensor while tracing, so that the exported model computes it
            out["defect_score"] = defect_scores[i] if tracing else float(defect_scores[i])
        return processed

    def _no_detections(self, image_size):
        return Instances(
            image_size,
            pred_boxes=Boxes(torch.zeros(0, 4, device=self.device)),
            scores=torch.zeros(0, device=self.device),
            pred_classes=torch.zeros(0, dtype=torch.long, device=self.device),
        )
