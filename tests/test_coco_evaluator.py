"""FastCOCOEvaluator (faster-coco-eval inside Detectron2's COCOEvaluator) against COCOEvaluator with pycocotools."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from d2_defects.evaluation import FastCOCOEvaluator


def _outputs(records, seed):
    """Per image: every ground-truth box jittered, half of them with a random class (scored lower), plus random
    boxes."""
    rng = np.random.default_rng(seed)
    num_classes = len(MetadataCatalog.get("tiny_defects_val").thing_classes)
    inputs, outputs = [], []
    for r in records:
        boxes, classes, scores = [], [], []
        for a in r["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            j = rng.normal(0, 2.0, 4)
            boxes.append([x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3]])
            right = rng.random() < 0.5
            classes.append(a["category_id"] if right else int(rng.integers(num_classes)))
            scores.append(rng.uniform(0.3, 1.0) if right else rng.uniform(0.0, 0.7))
        for _ in range(int(rng.integers(3, 40))):
            x, y = rng.uniform(0, r["width"] - 20), rng.uniform(0, r["height"] - 20)
            w, h = rng.uniform(4, 20, 2)
            boxes.append([x, y, x + w, y + h])
            classes.append(int(rng.integers(num_classes)))
            scores.append(rng.uniform(0.0, 0.7))
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(scores, dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({"image_id": r["image_id"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()["bbox"]


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_coco_evaluator_gives_pycocotools_numbers(synthetic_root, tmp_path, seed):
    records = DatasetCatalog.get("tiny_defects_val")
    inputs, outputs = _outputs(records, seed)
    official = _evaluate(COCOEvaluator("tiny_defects_val", tasks=("bbox",), distributed=False,
                                       output_dir=str(tmp_path / "official"), use_fast_impl=False),
                         inputs, outputs)
    fast_ev = FastCOCOEvaluator("tiny_defects_val", tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "fast"))
    assert fast_ev._cocoeval_fn.__module__.startswith("faster_coco_eval")  # not the fallback
    fast = _evaluate(fast_ev, inputs, outputs)
    assert 5 < official["AP"] < 95  # detections exist and the task is neither trivial nor hopeless
    assert sorted(fast) == sorted(official)
    for k, v in official.items():
        if np.isnan(v):
            assert np.isnan(fast[k]), k
        else:
            assert fast[k] == pytest.approx(v, abs=1e-9), k
    # the same results file, with the dataset's own category ids
    assert json.loads((tmp_path / "fast" / "coco_instances_results.json").read_text()) == \
        json.loads((tmp_path / "official" / "coco_instances_results.json").read_text())


def test_no_detections_is_not_an_error(synthetic_root, tmp_path):
    records = DatasetCatalog.get("tiny_defects_val")
    inputs, outputs = _outputs(records, 0)
    for o in outputs:
        o["instances"] = o["instances"][:0]
    res = _evaluate(FastCOCOEvaluator("tiny_defects_val", tasks=("bbox",), distributed=False), inputs, outputs)
    assert res["AP"] == 0 or np.isnan(res["AP"])
