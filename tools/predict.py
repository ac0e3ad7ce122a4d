#!/usr/bin/env python
"""Run a trained model on a folder (or glob) of images and write COCO results, a CSV and drawings.

    python tools/predict.py --config-file configs/synthetic/cascade_r18_cpu.yaml --input images/ \\
        --output output/predictions --draw MODEL.WEIGHTS output/demo/model_final.pth [TEST.AUG.ENABLED True]
        [TEST.SLICE.ENABLED True TEST.SLICE.SIZE "(512, 512)"]   # large images: tiles, merged once
    python tools/predict.py --config-file CONFIG --input images/ --output out/ --exported export/  # deployed model

Writes into --output: results.json (COCO results), images.json (image ids -> file names and sizes, and
the image-level defect_score of models that output one, e.g. DefectRCNN), results.csv, skipped.txt
(unreadable files) and, with --draw, vis/*.png. Unreadable images are reported
and skipped. With --exported, the model exported by tools/export_model.py runs in its runtime with its
postprocess.py (plain or sliced inference; no TTA) instead of the eager model. Existing results are never replaced without --overwrite.
"""
import argparse
import logging
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets and models
from d2_defects.config import load_config
from d2_defects.utils.errors import UsageError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml)")
    p.add_argument("--input", required=True, help="image folder (recursive), glob pattern or one image file")
    p.add_argument("--output", required=True, help="folder for the result files")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--dataset", default=None,
                   help="registered dataset whose class names/ids to use (default: first of DATASETS.TEST)")
    p.add_argument("--draw", action="store_true", help="also write vis/<image>.png with the detections")
    p.add_argument("--draw-threshold", type=float, default=0.3, help="hide detections below this score in PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    p.add_argument("--exported", default=None, metavar="DIR",
                   help="run the model exported into DIR by tools/export_model.py (its runtime + postprocess.py) "
                        "instead of the eager model; MODEL.WEIGHTS is then not needed")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (e.g. MODEL.WEIGHTS)")
    return p.parse_args(argv)


def _metadata(cfg, name):
    from detectron2.data import MetadataCatalog

    names = [name] if name else list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    for n in names:
        meta = MetadataCatalog.get(n)
        if getattr(meta, "thing_classes", None):
            return meta
    if name:
        raise UsageError(f"dataset {name} has no class names (is it registered?)")
    return None


def _exported_detector(cfg, folder):
    """The exported model of ``folder`` behind the eager model's interface; a config that differs from the export's
    settings, or asks for TTA, is one error."""
    from d2_defects.inference.export import ExportedDetector, check_matches_config, load_exported

    if cfg.TEST.AUG.ENABLED:
        raise UsageError("--exported runs plain or sliced inference; test-time augmentation (TEST.AUG.ENABLED) "
                         "needs the eager model")
    exported = load_exported(folder)
    check_matches_config(cfg, exported, folder)
    return ExportedDetector(exported)


def run(args):
    from detectron2.data.detection_utils import convert_image_to_rgb
    from d2_defects.inference import BatchPredictor, ResultsWriter, list_images

    cfg = load_config(args.config_file, args.opts)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = _exported_detector(cfg, args.exported) if args.exported else None
    if model is None and not cfg.MODEL.WEIGHTS:
        raise UsageError("no weights: pass MODEL.WEIGHTS path/to/model_final.pth")
    files = list_images(args.input)
    meta = _metadata(cfg, args.dataset)
    writer = ResultsWriter(args.output, meta, overwrite=args.overwrite, draw=args.draw, draw_threshold=args.draw_threshold)
    predictor = BatchPredictor(cfg, model=model)  # config values are checked (ConfigError) when the model is built
    n_det = 0
    for image_id, (path, image, output, error) in enumerate(
        predictor.predict_files(files, args.batch_size, args.num_workers, progress=tqdm), start=1
    ):
        if error is not None:
            tqdm.write(f"WARNING: skipped {error}", file=sys.stderr)
            writer.skip(path, error)
            continue
        rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT) if args.draw else None
        writer.add(image_id, path, output["instances"], rgb=rgb, defect_score=output.get("defect_score"))
        n_det += len(output["instances"])
    out = writer.close()
    print(f"{len(files) - len(writer.skipped)} images, {n_det} detections -> {out}"
          + (f"; {len(writer.skipped)} unreadable files skipped (see skipped.txt)" if writer.skipped else ""))
    return 0


def _main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    return run(args)


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
