"""Box predictor whose inference goes through the project's postprocessing (see ``..postprocess``)."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..postprocess import PostprocessParams, detection_inference

__all__ = ["DefectFastRCNNOutputLayers"]


class DefectFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    ``FastRCNNOutputLayers`` whose ``inference`` calls :func:`detection_inference`, so that the config's
    postprocessing options apply to every ROI head built with it. Training is unchanged.
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
        ret["postprocess"] = PostprocessParams.from_config(cfg)
        return ret

    def inference(self, predictions, proposals):
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        image_shapes = [x.image_size for x in proposals]
        return detection_inference(boxes, scores, image_shapes, self.postprocess)
