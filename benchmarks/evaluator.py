"""DefectEvaluator's scoring vs pycocotools' COCOeval on the same detections (preset "coco").

    PYTHONPATH=. python benchmarks/evaluator.py --images 5000 --repeats 3

Baseline: ``COCO.loadRes`` + ``COCOeval.evaluate/accumulate/summarize`` (what COCOEvaluator runs without
detectron2's compiled ``_C``). Candidate: ``d2_defects.evaluation.evaluate_detections`` with preset
"coco" and AP_METHOD "coco" (same AP, checked below). Both start from in-memory detections.
"""
import contextlib
import io

import numpy as np
from common import base_parser, compare, print_table  # benchmarks/common.py (the script's folder)
from detectron2.structures import BoxMode

from d2_defects.evaluation import DefectEvalSettings, evaluate_detections


def make_data(num_images, num_classes=6, seed=0):
    """COCO dict + results list resembling a defect detector's output (~3 GT, ~20 detections per image)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(num_images):
        images.append({"id": i + 1, "width": 512, "height": 384, "file_name": f"{i}.png"})
        gts = []
        for _ in range(rng.integers(0, 7)):
            c = int(rng.integers(0, num_classes))
            b = [rng.uniform(0, 450), rng.uniform(0, 320), rng.uniform(3, 80), rng.uniform(3, 80)]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
            gts.append((c, b))
        for _ in range(rng.integers(5, 36)):
            if gts and rng.random() < 0.5:
                c, b = gts[rng.integers(len(gts))]
                b = [b[0] + rng.normal(0, 3), b[1] + rng.normal(0, 3), b[2] * rng.uniform(0.7, 1.3),
                     b[3] * rng.uniform(0.7, 1.3)]
            else:
                c = int(rng.integers(0, num_classes))
                b = [rng.uniform(0, 450), rng.uniform(0, 320), rng.uniform(3, 80), rng.uniform(3, 80)]
            dets.append({"image_id": i + 1, "category_id": c + 1, "bbox": b, "score": float(rng.random())})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(num_classes)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def main():
    p = base_parser(__doc__)
    p.add_argument("--images", type=int, default=5000)
    args = p.parse_args()
    args.repeats = args.repeats if args.repeats != 10 else 3
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_dict, dets = make_data(args.images)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_dict
        gt.createIndex()
    records = {im["id"]: {"image_id": im["id"], "annotations": []} for im in coco_dict["images"]}
    for a in coco_dict["annotations"]:
        records[a["image_id"]]["annotations"].append(
            {"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": a["category_id"] - 1, "iscrowd": 0})
    records = list(records.values())
    per = {}
    for d in dets:
        per.setdefault(d["image_id"], []).append(d)
    preds = [{"image_id": i, "boxes": np.array([d["bbox"] for d in v]), "scores": np.array([d["score"] for d in v]),
              "classes": np.array([d["category_id"] - 1 for d in v])} for i, v in per.items()]
    names = [c["name"] for c in coco_dict["categories"]]
    out = {}

    def baseline():
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out["coco"] = ev.stats[0] * 100

    def candidate():
        out["ours"] = evaluate_detections(records, preds, names, DefectEvalSettings(iou="coco")).mAP

    row = compare(f"COCO AP, {args.images} images, {len(dets)} detections", baseline, candidate,
                  repeats=args.repeats, warmup=1)
    print_table([row], title="Defect evaluator vs pycocotools COCOeval")
    print(f"\nspeed-up {1 / row['ratio']:.1f}x; AP pycocotools {out['coco']:.4f}, ours {out['ours']:.4f}")


if __name__ == "__main__":
    main()
