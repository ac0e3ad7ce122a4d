"""Upstream bodies the project restates (kept short, each naming detectron2 a59f056 / fvcore 0.1.5.post20221221):
when the installed original changes, this test fails and names the restating place, so that an upgrade of
Detectron2 or fvcore is a visible decision (review the restatement, then update the hash here)."""
import hashlib
import importlib
import inspect

import pytest

# upstream object -> (sha256 of its source, first 16 hex digits; where the project restates it)
RESTATED = {
    "detectron2.engine.defaults.DefaultTrainer.__init__":
        ("d7a2d86462019047", "d2_defects/engine/trainer.py Trainer.__init__"),
    "detectron2.modeling.meta_arch.rcnn.GeneralizedRCNN.forward":
        ("a3514388952a870b", "d2_defects/modeling/meta_arch/defect_rcnn.py DefectRCNN.forward (training branch)"),
    "detectron2.modeling.meta_arch.rcnn.GeneralizedRCNN.inference":
        ("2cc8cec1fb919c82", "d2_defects/inference/export.py _FlatDetector"),
    "detectron2.modeling.meta_arch.dense_detector.DenseDetector.forward":
        ("cc20888ea81c7539", "d2_defects/inference/export.py _FlatDetector"),
    "detectron2.modeling.roi_heads.cascade_rcnn.CascadeROIHeads._forward_box":
        ("63c9a938f5445233", "d2_defects/modeling/roi_heads/cascade.py (inference with stage score weights)"),
    "detectron2.modeling.roi_heads.roi_heads.ROIHeads._sample_proposals":
        ("3157d2e3b8c2c9ff", "d2_defects/modeling/roi_heads/ohem.py _sample_proposals"),
    "detectron2.modeling.roi_heads.fast_rcnn.FastRCNNOutputLayers.losses":
        ("7cfbdc99af0cec9f", "d2_defects/modeling/roi_heads/ohem.py per_proposal_losses"),
    "detectron2.modeling.roi_heads.fast_rcnn.fast_rcnn_inference_single_image":
        ("d3327bc01fbb1490", "d2_defects/modeling/postprocess.py"),
    "detectron2.modeling.meta_arch.fcos.FCOS.losses":
        ("d0cea8e432de36ca", "d2_defects/modeling/meta_arch/fcos.py DefectFCOS.losses"),
    "detectron2.data.dataset_mapper.DatasetMapper.__call__":
        ("32252e8432d1bba2", "d2_defects/data/mapper.py DefectDatasetMapper.__call__"),
    "detectron2.checkpoint.detection_checkpoint.DetectionCheckpointer._load_file":
        ("b01551bdb3eead54", "d2_defects/checkpoint.py DefectCheckpointer._load_pkl"),
    "detectron2.evaluation.coco_evaluation.COCOEvaluator._eval_predictions":
        ("af889c28df2ab0c9", "d2_defects/evaluation/coco_evaluator.py FastCOCOEvaluator._eval_predictions"),
    "detectron2.evaluation.coco_evaluation._evaluate_predictions_on_coco":
        ("841f6c75c9fc6faf", "d2_defects/evaluation/coco_evaluator.py (called with faster-coco-eval's COCOeval)"),
    "fvcore.common.checkpoint.Checkpointer.save":
        ("1ae94732e8613f3a", "d2_defects/checkpoint.py DefectCheckpointer.save"),
}


def _resolve(qualname):
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualname)


@pytest.mark.parametrize("qualname", sorted(RESTATED))
def test_restated_upstream_source_is_unchanged(qualname):
    expected, where = RESTATED[qualname]
    source = inspect.getsource(_resolve(qualname))
    got = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert got == expected, (
        f"the installed {qualname} changed (source hash {got}, restated from {expected}): review {where} "
        "against the new upstream body, then update RESTATED in this test")
