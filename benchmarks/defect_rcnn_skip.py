#!/usr/bin/env python
"""DefectRCNN: speed and accuracy of skipping the RPN/ROI heads on images scored normal.

Evaluates one trained DefectRCNN checkpoint on a test dataset at several MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD
values (same process, same weights): inference time per image (median over the dataset, and the ratio to
threshold 0 = no skipping), share of images skipped, COCO AP/AP50, and image-level ACC (defect vs normal) of
(a) the image head (defect_score >= 0.5) and (b) the boxes (any detection with score >= --box-thresh).

    python benchmarks/defect_rcnn_skip.py --config-file configs/synthetic/defect_rcnn_r18_cpu.yaml \
        --weights output/synthetic/defect_rcnn_r18_cpu/model_final.pth --thresholds 0 0.1 0.3 0.5
"""
import argparse
import contextlib
import io
import statistics
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from tqdm import tqdm

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config


def run(model, loader, threshold, evaluator, box_thresh):
    model.skip_normal_threshold = threshold
    evaluator.reset()
    times, skipped, head_ok, box_ok, n = [], 0, 0, 0, 0
    with torch.no_grad():
        for inputs in tqdm(loader, desc=f"threshold {threshold}", leave=False):
            t0 = time.perf_counter()
            outputs = model(inputs)
            times.append((time.perf_counter() - t0) / len(inputs))
            evaluator.process(inputs, outputs)
            for inp, out in zip(inputs, outputs):
                truth = inp["has_defect"]
                skipped += out["defect_score"] < threshold
                head_ok += (out["defect_score"] >= 0.5) == truth
                box_ok += bool((out["instances"].scores >= box_thresh).any()) == truth
                n += 1
    with contextlib.redirect_stdout(io.StringIO()):
        ap = evaluator.evaluate()["bbox"]
    return dict(threshold=threshold, time=statistics.median(times), skipped=skipped / n, ap=ap["AP"],
                ap50=ap["AP50"], acc_head=head_ok / n, acc_boxes=box_ok / n, n=n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="trained DefectRCNN checkpoint")
    p.add_argument("--dataset", default=None, help="test dataset (default: the config's DATASETS.TEST[0])")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    p.add_argument("--box-thresh", type=float, default=0.3, help="detection score that makes an image 'defect'")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    has_defect = {d["image_id"]: bool(d["annotations"]) for d in DatasetCatalog.get(dataset)}
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(args.weights)
    loader = build_detection_test_loader(cfg, dataset)
    inputs = []
    for batch in loader:
        if args.max_images is not None and len(inputs) >= args.max_images:
            break
        inputs.append([dict(x, has_defect=has_defect[x["image_id"]]) for x in batch])
    evaluator = COCOEvaluator(dataset, tasks=("bbox",), output_dir=None)
    run(model, inputs[:5], 0.0, evaluator, args.box_thresh)  # warm-up
    rows = [run(model, inputs, t, evaluator, args.box_thresh) for t in args.thresholds]
    base = rows[0]["time"]
    print(f"\n### DefectRCNN skip threshold ({dataset}, {rows[0]['n']} images, {cfg.MODEL.DEVICE})\n")
    print("| SKIP_NORMAL_THRESHOLD | images skipped | time/image (median) | ratio | AP | AP50 | ACC image head | ACC boxes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']} | {100 * r['skipped']:.1f}% | {r['time'] * 1e3:.1f} ms | {r['time'] / base:.3f}x "
              f"| {r['ap']:.2f} | {r['ap50']:.2f} | {r['acc_head']:.3f} | {r['acc_boxes']:.3f} |")


if __name__ == "__main__":
    main()
