#!/usr/bin/env python
"""Export a trained detector to TorchScript, ONNX (ONNX Runtime) or OpenVINO and check that the exported
model, run in its runtime, gives the eager model's detections on sample images.

    python tools/export_model.py --config-file configs/synthetic/cascade_r18_cpu.yaml --output export/ \\
        --format onnx --sample-images datasets/synthetic_defects/val MODEL.WEIGHTS output/demo/model_final.pth

Writes into --output: the model file (model.ts, model.onnx, or model.xml + model.bin), postprocess.py and
postprocess.json. The graph takes one CHW uint8 image in INPUT.FORMAT resized to the test size and returns
every candidate above the score thresholds (boxes, classes, scores, then image-level outputs such as
DefectRCNN's defect_score); postprocess.py (numpy only) applies NMS or soft-NMS and the top-k with the
settings in postprocess.json. See docs/deploy.md. The parity check runs exactly that (runtime + postprocess.py)
and exits with one ERROR line (code 2) when a detection differs by more than --atol px or --score-atol, as
it does when the model cannot be exported. With TEST.SLICE.ENABLED the graph is the same per-tile model; the
slice settings are recorded in postprocess.json and a second parity check compares sliced inference (tiles,
resize and merge in Python, d2_defects.inference.export.sliced_exported) with the eager sliced model on the sample
images at their original size (docs/slicing.md). Existing files are never replaced without --overwrite.

    python tools/export_model.py --config-file CFG --output export_int8/ --format openvino --int8 \
        --sample-images datasets/synthetic_defects/val --calibration-images datasets/synthetic_defects/train \
        MODEL.WEIGHTS output/demo/model_final.pth

--int8 (onnx, openvino): the FP32 graph is exported and parity-checked as above, then quantized to INT8
(convolutions and fully connected layers; calibration on --num-calibration images of --calibration-images) and
written in the format asked for; printed: how many of the eager model's detections the INT8 model finds
(docs/deploy.md, "INT8").
"""
import argparse
import sys

import d2_defects  # noqa: F401  registers models
from d2_defects.config import load_config
from d2_defects.inference.export import FORMATS, ExportError
from d2_defects.utils.errors import ConfigError, DefectsError, UsageError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml)")
    p.add_argument("--output", required=True, help="folder for the model file, postprocess.py and postprocess.json")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="default torchscript")
    p.add_argument("--sample-images", default=None,
                   help="folder/glob of images for tracing and the parity check (default: random images)")
    p.add_argument("--num-samples", type=int, default=3, help="images used for the parity check (default 3)")
    p.add_argument("--atol", type=float, default=1e-3, help="allowed box difference in px (default 1e-3)")
    p.add_argument("--score-atol", type=float, default=1e-4,
                   help="allowed score (and defect_score) difference (default 1e-4)")
    p.add_argument("--mask-atol", type=float, default=0.01,
                   help="mask models: allowed share of a mask's pixels that differ (default 0.01)")
    p.add_argument("--int8", action="store_true", help="quantize to INT8 after the FP32 parity check (onnx, openvino)")
    p.add_argument("--calibration-images", default=None,
                   help="--int8: folder/glob of calibration images, e.g. the training images (default: --sample-images)")
    p.add_argument("--num-calibration", type=int, default=32, help="--int8: calibration images used (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing exported files")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (e.g. MODEL.WEIGHTS)")
    return p.parse_args(argv)


def run(args):
    from detectron2.modeling import build_model

    from d2_defects.checkpoint import DefectCheckpointer
    from d2_defects.inference.export import (
        check_exportable, check_parity, check_sliced_parity, export_model, load_exported, load_samples, output_files,
    )
    from d2_defects.modeling.slicing import slice_options
    from d2_defects.utils.fileio import check_can_write

    for name in ("atol", "score_atol", "mask_atol"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.int8:
        from d2_defects.inference.quantize import INT8_FORMATS

        if args.format not in INT8_FORMATS:
            raise UsageError(f"--int8 is for --format {' or '.join(INT8_FORMATS)}, not {args.format}")
        if not (args.calibration_images or args.sample_images):
            raise UsageError("--int8 needs calibration images: --calibration-images FOLDER/GLOB (e.g. the training "
                             "images)")
        if args.num_calibration < 1:
            raise UsageError(f"--num-calibration must be >= 1, got {args.num_calibration}")
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise UsageError("no weights: pass MODEL.WEIGHTS path/to/model_final.pth")
    try:
        check_exportable(cfg)
    except ExportError as e:
        raise ExportError(f"{e} ({args.config_file})") from None
    sliced = slice_options(cfg) if cfg.TEST.SLICE.ENABLED else None  # a bad TEST.SLICE value: ConfigError now
    if cfg.MODEL.DEVICE != "cpu":
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"  # the runtimes of the exported files run on CPU; so does the traced graph
        cfg.freeze()
    check_can_write(output_files(args.output, args.format), args.overwrite)
    try:
        model = build_model(cfg)
    except DefectsError:
        raise
    except ValueError as e:  # config values checked when the model is built
        raise ConfigError(str(e)) from None
    DefectCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    samples = load_samples(cfg, args.sample_images, args.num_samples)
    meta = dict(input_format=cfg.INPUT.FORMAT, min_size_test=cfg.INPUT.MIN_SIZE_TEST,
                max_size_test=cfg.INPUT.MAX_SIZE_TEST, config=args.config_file, slice=sliced)
    fmt = "onnx (FP32, before INT8 quantization)" if args.int8 else args.format

    def parity(folder, fmt_name):
        exported = load_exported(folder, fmt_name)
        report = check_parity(model, exported, samples, args.atol, args.score_atol, args.mask_atol)
        lines = [f"parity of {fmt} + postprocess.py with the eager model on {len(samples)} images: max box "
                 f"difference {report['max_box_diff']:.2e} px, max score difference {report['max_score_diff']:.2e}"
                 + (f", max mask difference {100 * report['max_mask_diff']:.3f}% of a mask's pixels"
                    if "masks" in exported.outputs else "")]
        if sliced:
            originals = load_samples(cfg, args.sample_images, args.num_samples, resize=False)
            report = check_sliced_parity(cfg, model, exported, originals, args.atol, args.score_atol)  # boxes only
            lines.append(f"parity of sliced inference ({sliced['size'][0]}x{sliced['size'][1]} px tiles) with {fmt} "
                         f"and the eager model on {len(originals)} images: max box difference "
                         f"{report['max_box_diff']:.2e} px, max score difference {report['max_score_diff']:.2e}")
        return lines

    try:
        if args.int8:
            from d2_defects.inference.quantize import export_int8, int8_agreement

            calibration = load_samples(cfg, args.calibration_images or args.sample_images, args.num_calibration)
            files, lines = export_int8(model, samples[0], args.output, args.format, calibration,
                                       lambda folder: parity(folder, "onnx"), meta=meta)
        else:
            files = export_model(model, samples[0], args.output, args.format, meta=meta)
            lines = None
    except ExportError as e:
        raise ExportError(f"{e} ({args.config_file}, --format {args.format})") from None
    lines = lines or parity(args.output, args.format)
    print(f"wrote {', '.join(files)}")
    print("\n".join(lines))
    if args.int8:
        agree = int8_agreement(model, load_exported(args.output, args.format), samples)
        print(f"INT8 {args.format} ({len(calibration)} calibration images) against the eager model on {len(samples)} "
              f"images: {agree['found']} of its {agree['eager']} detections scoring >= 0.3 found (same class, IoU "
              f">= 0.5), max score difference {agree['max_score_diff']:.3f}; measure AP with "
              "benchmarks/int8_export.py")
    return 0


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(run, parse_args(argv), exit=False)


if __name__ == "__main__":
    sys.exit(main())
