"""Box predictor whose inference goes through the project's postprocessing (see ``..postprocess``)."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..postprocess import PostprocessParams, detection_inference

__all__ = ["DefectFastRCNNOutputLayers"]


class DefectFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    ``FastRCNNOutputLayers`` whose ``inference`` calls :func:`detection_inference`, so that the config's
    postprocessing options (``MODEL.SOFT_NMS.*``, ``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS``) apply to every
    ROI head built with it. Training is unchanged; with soft-NMS off and no per-class thresholds, inference
    gives the same detections as the parent class.

    Args (in addition to ``FastRCNNOutputLayers``'s):
        postprocess (PostprocessParams): default: hard NMS with the parent's test_* thresholds.
    """

    @configurable
    def __init__(self, *args, postprocess: PostprocessParams = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.postprocess = postprocess or PostprocessParams(
            score_thresh=self.test_score_thresh, nms_thresh=self.test_nms_thresh,
            topk_per_image=self.test_topk_per_image,
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        # Raises a ValueError naming the key for bad MODEL.SOFT_NMS.* / SCORE_THRESH_PER_CLASS values.
        ret["postprocess"] = PostprocessParams.from_config(cfg, num_classes=ret["num_classes"])
        return ret

    def inference(self, predictions, proposals):
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        image_shapes = [x.image_size for x in proposals]
        return detection_inference(boxes, scores, image_shapes, self.postprocess)
