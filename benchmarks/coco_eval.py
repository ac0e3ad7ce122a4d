"""FastCOCOEvaluator's COCO API (faster-coco-eval) vs pycocotools' COCOeval, on the same detections.

    PYTHONPATH=. python benchmarks/coco_eval.py --images 5000 --repeats 3

Both run Detectron2's ``_evaluate_predictions_on_coco`` (``loadRes``, ``evaluate``, ``accumulate``, ``summarize``)
on the same in-memory COCO ground truth and results (benchmarks/evaluator.py's generator: ~3 boxes and ~20
detections per image, 6 classes); only ``cocoeval_fn`` differs. The AP of both is checked equal first.
"""
import contextlib
import copy
import io

from common import base_parser, compare, print_table  # benchmarks/common.py (the script's folder)
from evaluator import make_data  # benchmarks/evaluator.py
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2_defects.evaluation.coco_evaluator import fast_cocoeval_class


def main():
    p = base_parser(__doc__)
    p.add_argument("--images", type=int, default=5000)
    args = p.parse_args()
    coco, dets = make_data(args.images)
    coco["categories"] = [{"id": i + 1, "name": f"c{i}"} for i in range(6)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco
        gt.createIndex()
    fast = fast_cocoeval_class()

    def run(fn):
        with contextlib.redirect_stdout(io.StringIO()):
            return _evaluate_predictions_on_coco(gt, copy.deepcopy(dets), "bbox", cocoeval_fn=fn)

    a, b = run(COCOeval).stats, run(fast).stats
    assert all(abs(x - y) < 1e-9 for x, y in zip(a, b)), (a, b)
    print(f"{args.images} images, {len(coco['annotations'])} boxes, {len(dets)} detections; AP {a[0] * 100:.2f} "
          f"(both); candidate {fast.__module__}.{fast.__name__}")
    rows = [compare(f"COCO bbox eval, {args.images} images", lambda: run(COCOeval), lambda: run(fast),
                    repeats=args.repeats, warmup=args.warmup)]
    print_table(rows, "pycocotools COCOeval (baseline) vs faster-coco-eval (candidate)")


if __name__ == "__main__":
    main()
