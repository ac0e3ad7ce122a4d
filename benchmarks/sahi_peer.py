"""Sliced inference against SAHI's, on the same model and images: AP (pycocotools) and time per image.

    python benchmarks/sahi_peer.py --config-file output/ablation/slicing/sliced_train/seed0/config.yaml \\
        --weights output/ablation/slicing/sliced_train/seed0/model_final.pth --threads 1

The model is built from the config (its ``TEST.SLICE`` settings: tile size, overlap, whole-image view) and runs on
every image of ``--dataset`` (default: the config's first test set) in three or four ways, one image at a time, in this
process and interleaved image by image (so that load drifts hit all three alike):

- ``ours``: the project's sliced inference (``SlicedDetector`` at ``TEST.SLICE.BATCH`` 1, one tile per pass like
  SAHI; merged once by ``TEST.SLICE.MERGE``, by default the heads' postprocessing, soft-NMS when it is on);
- ``sahi_nms``: SAHI's ``get_sliced_prediction`` with the same tiles, each tile through the same model (resized
  by ``INPUT.MIN_SIZE_TEST`` as ours), merged by SAHI's class-aware NMS at ``MODEL.ROI_HEADS.NMS_THRESH_TEST``;
- ``sahi_default``: the same with SAHI's default merge (greedy NMM, IOS 0.5);
- with ``--exported DIR`` (written by ``tools/export_model.py`` from the same weights): ``ours_exported``, the
  project's sliced inference with the exported model in its runtime (``sliced_exported``).

SAHI (requirements-oracles.txt, installed by bootstrap.sh into ``$VENV/oracles``) is the peer here and in
``tests/test_slicing.py``, never the project's runtime path. Ratios are against ``ours``: medians of per-image
times.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ORACLES = os.path.join(sys.prefix, "oracles")
if os.path.isdir(ORACLES) and ORACLES not in sys.path:
    sys.path.append(ORACLES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml) with the TEST.SLICE settings")
    p.add_argument("--weights", required=True, help="checkpoint (model_final.pth)")
    p.add_argument("--dataset", default=None, help="registered test set (default: the config's first DATASETS.TEST)")
    p.add_argument("--num-images", type=int, default=0, help="first N images only (default 0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--exported", default=None, metavar="DIR",
                   help="also run the model exported into DIR (tools/export_model.py, same weights), sliced")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def _peer_class():
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

    class Peer(DetectionModel):
        """One SAHI tile through the project's model, resized like the project's sliced inference resizes it."""

        def set_model(self, model, **kwargs):
            self.model = model

        def perform_inference(self, image):
            crop = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            h, w = image.shape[:2]
            with torch.no_grad():
                self._original_predictions = self.model.model(
                    [{"image": self.model._resized(crop), "height": h, "width": w}])[0]["instances"]

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],
                                                                     full_shape_list=None):
            inst = self._original_predictions
            # the whole-image pass gives flat [x, y] / [h, w] lists, the tiles nested ones (SAHI's own models fix both)
            shift_amount_list = fix_shift_amount_list(shift_amount_list)
            full_shape_list = fix_full_shape_list(full_shape_list)
            self._object_prediction_list_per_image = [[
                ObjectPrediction(bbox=b.tolist(), category_id=int(c), category_name=str(int(c)), score=float(s),
                                 shift_amount=shift_amount_list[0],
                                 full_shape=full_shape_list[0] if full_shape_list else None)
                for b, s, c in zip(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)]]

    return Peer


def _coco_eval(gt_json, results, image_ids):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        if not results:
            return dict(AP=0.0, AP50=0.0, APs=0.0 if ev_has_small(gt, image_ids) else float("nan"))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval gives -1 where there is no object (of a size range): reported as nan ("n/a" in the table)
    stat = {k: 100 * ev.stats[i] if ev.stats[i] >= 0 else float("nan") for k, i in (("AP", 0), ("AP50", 1), ("APs", 3))}
    return stat


def ev_has_small(gt, image_ids):
    return any(a["area"] < 32 ** 2 for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, iscrowd=False)))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from sahi.predict import get_sliced_prediction
    from tqdm import tqdm

    import d2_defects  # noqa: F401  registers datasets and models
    from d2_defects.checkpoint import DefectCheckpointer
    from d2_defects.config import load_config
    from d2_defects.inference.predictor import read_image
    from d2_defects.modeling.slicing import SlicedDetector

    # one tile per forward pass, as SAHI runs them (an eager batch zero-pads tiles of other sizes: docs/slicing.md)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu", "TEST.SLICE.ENABLED", "True", "TEST.SLICE.BATCH", "1"]
                      + args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    records = DatasetCatalog.get(dataset)[: args.num_images or None]
    to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    model = build_model(cfg)
    DefectCheckpointer(model).load(args.weights)
    ours = SlicedDetector(cfg, model.eval()).eval()
    opts = ours.options
    (th, tw), ov = opts["size"], opts["overlap"]
    peer = _peer_class()(model=ours, confidence_threshold=float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
                         category_mapping={str(i): str(i) for i in range(len(meta.thing_classes))}, device="cpu")
    sahi_kw = dict(slice_height=th, slice_width=tw, overlap_height_ratio=ov, overlap_width_ratio=ov,
                   perform_standard_pred=opts["include_full"], verbose=0, auto_slice_resolution=False,
                   postprocess_class_agnostic=False,
                   # below a confidence threshold of 0.1 SAHI would switch its merge to NMS: keep the one asked for
                   force_postprocess_type=True)
    def run_ours(img):
        inst = ours([{"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))}])[0]["instances"]
        return [(b.tolist(), float(s), int(c)) for b, s, c in zip(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)]

    methods = {
        "ours": run_ours,
        "sahi_nms": dict(postprocess_type="NMS", postprocess_match_metric="IOU",
                         postprocess_match_threshold=float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST)),
        "sahi_default": dict(postprocess_type="GREEDYNMM", postprocess_match_metric="IOS",
                             postprocess_match_threshold=0.5),
    }

    if args.exported:
        from d2_defects.inference.export import load_exported, sliced_exported

        exported = sliced_exported(cfg, load_exported(args.exported, threads=args.threads))

        def run_exported(img):
            inst = exported([{"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))}])[0]["instances"]
            return [(b.tolist(), float(s), int(c)) for b, s, c in
                    zip(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)]

        methods["ours_exported"] = run_exported

    def run(name, img):
        if callable(methods[name]):
            return methods[name](img)
        res = get_sliced_prediction(img, peer, **sahi_kw, **methods[name])
        return [(p.bbox.to_xyxy(), p.score.value, p.category.id) for p in res.object_prediction_list]

    results = {k: [] for k in methods}
    times = {k: [] for k in methods}
    for rec in tqdm(records, desc="images", unit="img"):
        img = read_image(rec["file_name"], cfg.INPUT.FORMAT)
        for name in methods:
            t0 = time.perf_counter()
            dets = run(name, img)
            times[name].append(time.perf_counter() - t0)
            for (x0, y0, x1, y1), s, c in dets:
                results[name].append(dict(image_id=rec["image_id"], category_id=to_dataset_id[c], score=float(s),
                                          bbox=[x0, y0, x1 - x0, y1 - y0]))
    ids = [r["image_id"] for r in records]
    base = statistics.median(times["ours"])
    rows = []
    for name in methods:
        ap = _coco_eval(meta.json_file, results[name], ids)
        med = statistics.median(times[name])
        rows.append(dict(method=name, **ap, ms_per_image=1e3 * med, ratio=med / base,
                         detections_per_image=len(results[name]) / max(1, len(records))))
    print(f"{dataset}: {len(records)} images, {th}x{tw} px tiles at overlap {ov}, whole image "
          f"{'added' if opts['include_full'] else 'not added'}, {args.threads} thread(s)")
    print("| method | AP | AP50 | APs | ms/image (median) | ratio to ours | detections/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ap, ap50, aps = ("n/a" if r[k] != r[k] else f"{r[k]:.1f}" for k in ("AP", "AP50", "APs"))
        print(f"| {r['method']} | {ap} | {ap50} | {aps} | {r['ms_per_image']:.0f} | "
              f"{r['ratio']:.2f}x | {r['detections_per_image']:.1f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(dataset=dataset, images=len(records), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
