#!/usr/bin/env python
"""Where each class loses its AP: found but badly placed, found with low scores, split into fragments, or missed.

Per class, on saved detections (a COCO results json, e.g. the coco_instances_results.json that evaluation
writes) against a COCO ground-truth json, with pycocotools:

- AP and recall at IoU 0.1 / 0.3 / 0.5 / 0.75 / 0.9 (area all, 100 detections): AP@0.1 high and AP@0.75 low
  means found but badly localised; recall@0.1 low means missed;
- the median score of each ground-truth box's best-overlapping detection of its class (IoU >= 0.5), against
  the median score of the class's false positives: a class scored below its own false positives loses AP to
  ranking, not to recall;
- fragments: detections of the class with score >= --fragment-score that overlap a box of that class by
  IoU 0.05-0.5 (a part of a long defect found as its own box), per ground-truth box.

    python benchmarks/where_ap_is_lost.py --gt datasets/synthetic_defects/annotations/instances_val.json \\
        --results output/demo/inference/synthetic_defects_val/coco_instances_results.json [--results ...]

Several --results (one per seed) print one table each, then the mean of their rows.
"""
import argparse
import contextlib
import io
import json
import os
import sys

import numpy as np

IOUS = (0.1, 0.3, 0.5, 0.75, 0.9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, help="COCO ground-truth json")
    p.add_argument("--results", required=True, action="append", help="COCO results json (repeat for seeds)")
    p.add_argument("--fragment-score", type=float, default=0.2, help="score from which a partial box counts")
    return p.parse_args(argv)


def analyse(coco_gt, results, fragment_score=0.2):
    """One row per category: AP / recall at :data:`IOUS`, median scores, fragments per box."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    coco_dt = coco_gt.loadRes(results) if results else None
    rows = []
    for cat in coco_gt.loadCats(coco_gt.getCatIds()):
        cid = cat["id"]
        row = {"class": cat["name"], "num_gt": len(coco_gt.getAnnIds(catIds=[cid], iscrowd=False))}
        if coco_dt is None or not row["num_gt"]:
            rows.append(row)
            continue
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = [cid]
        ev.params.iouThrs = np.array(IOUS)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][:, :, 0, 0, -1]  # [iou, recall, class, area all, maxDets 100]
        for i, t in enumerate(IOUS):
            p = prec[i][prec[i] > -1]
            row[f"AP@{t}"] = 100 * float(p.mean()) if p.size else float("nan")
            row[f"R@{t}"] = 100 * float(ev.eval["recall"][i, 0, 0, -1])
        best, fp_scores, fragments = [], [], 0
        for img in coco_gt.getImgIds():
            gts = [a["bbox"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img, catIds=[cid], iscrowd=False))]
            dts = coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=img, catIds=[cid]))
            if not dts:
                continue
            scores = np.array([d["score"] for d in dts])
            if not gts:
                fp_scores.extend(scores.tolist())
                continue
            iou = mask_utils.iou([d["bbox"] for d in dts], gts, [0] * len(gts))  # [det, gt]
            for g in range(len(gts)):
                hit = iou[:, g] >= 0.5
                if hit.any():
                    best.append(scores[hit].max())
            fp_scores.extend(scores[iou.max(1) < 0.5].tolist())
            fragments += int(((iou > 0.05) & (iou < 0.5) & (scores[:, None] >= fragment_score)).any(1).sum())
        row["score_tp"] = float(np.median(best)) if best else float("nan")
        row["score_fp"] = float(np.median(fp_scores)) if fp_scores else float("nan")
        row["fragments_per_gt"] = fragments / row["num_gt"]
        rows.append(row)
    return rows


COLUMNS = ["class", "num_gt"] + [f"AP@{t}" for t in IOUS] + [f"R@{t}" for t in IOUS] + \
    ["score_tp", "score_fp", "fragments_per_gt"]


def format_rows(rows, title):
    lines = [f"\n{title}\n", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c, "-")
            if not isinstance(v, float):
                cells.append(str(v))
            else:
                cells.append(f"{v:.2f}" if c.startswith("score") or c == "fragments_per_gt" else f"{v:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from pycocotools.coco import COCO

    for path in [args.gt] + args.results:
        if not os.path.isfile(path):
            print(f"ERROR: {path}: no such file", file=sys.stderr)
            return 2
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(args.gt)
    tables = []
    for path in args.results:
        with open(path) as f:
            results = json.load(f)
        with contextlib.redirect_stdout(io.StringIO()):
            rows = analyse(coco_gt, results, args.fragment_score)
        tables.append(rows)
        print(format_rows(rows, path))
    if len(tables) > 1:
        mean = []
        for per_class in zip(*tables):
            m = dict(per_class[0])
            for c in COLUMNS[2:]:
                vals = [r[c] for r in per_class if c in r]
                m[c] = float(np.nanmean(vals)) if vals else float("nan")
            mean.append(m)
        print(format_rows(mean, f"mean of {len(tables)} result files"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
