#!/usr/bin/env python
"""INT8 post-training quantization of an ONNX export: speed and AP against the FP32 export, per runtime.

    python tools/export_model.py --config-file CFG --output export/ --format onnx \
        --sample-images datasets/synthetic_defects/val MODEL.WEIGHTS model_final.pth
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/int8_export.py --config-file CFG --export export/ \
        --calibration 'datasets/synthetic_defects/train/*.png' --threads 1

The FP32 graph of --export is quantized as `tools/export_model.py --int8` does (d2_defects.inference.quantize:
ONNX Runtime's static quantizer, QDQ format, INT8 weights per output channel, UINT8 activations, MinMax
calibration on --num-calibration images of --calibration; --ops says which operators: convolutions, and the box
heads' fully connected layers with Gemm). Both graphs run in ONNX Runtime
and in OpenVINO (which reads the QDQ graph and runs the quantized operators in INT8), each with the export's
postprocess.py. Printed: AP / AP50 on the config's test set (pycocotools, all its images), and the median time
per image on the first --num-timed images (an image resized to the test size in, final detections out),
interleaved, with the ratio to FP32 in the same runtime. Only the onnx, onnxruntime and openvino packages of
requirements.txt are used; nothing is written next to --export (the INT8 files go to a temporary folder).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def quantize(src_dir, dst_dir, calibration, ops):
    """Write dst_dir/model.onnx (INT8 QDQ, the library's quantize_onnx) and copy postprocess.py / .json."""
    from d2_defects.inference.quantize import quantize_onnx

    os.makedirs(dst_dir, exist_ok=True)
    for f in ("postprocess.py", "postprocess.json"):
        shutil.copy(os.path.join(src_dir, f), dst_dir)
    quantize_onnx(os.path.join(src_dir, "model.onnx"), os.path.join(dst_dir, "model.onnx"), calibration, ops)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the config the model was exported with")
    p.add_argument("--export", required=True, help="folder written by tools/export_model.py --format onnx")
    p.add_argument("--calibration", required=True, help="folder/glob of calibration images (e.g. the train set)")
    p.add_argument("--num-calibration", type=int, default=32)
    p.add_argument("--num-timed", type=int, default=20, help="test images timed (all are evaluated)")
    p.add_argument("--ops", default="Conv,Gemm", help="comma-separated operator types to quantize")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args()

    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.transforms import ResizeShortestEdge
    from tqdm import tqdm

    import d2_defects  # noqa: F401  registers the datasets
    from d2_defects.config import load_config
    from d2_defects.inference.ensemble import evaluate_results
    from d2_defects.inference.export import ExportedModel, convert_openvino, load_samples
    from d2_defects.inference.predictor import read_image

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu"] + args.opts)
    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    records = DatasetCatalog.get(dataset)
    to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    resize = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    calibration = load_samples(cfg, args.calibration, args.num_calibration)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "fp32"), os.path.join(tmp, "int8")
        shutil.copytree(args.export, fp32)
        quantize(args.export, int8, calibration, args.ops.split(","))
        for folder in (fp32, int8):  # the same conversion for FP32 and INT8
            convert_openvino(os.path.join(folder, "model.onnx"), os.path.join(folder, "model.xml"))
        models = {f"{rt} {prec}": ExportedModel(folder, fmt, threads=args.threads)
                  for prec, folder in (("fp32", fp32), ("int8", int8))
                  for rt, fmt in (("onnxruntime", "onnx"), ("openvino", "openvino"))}
        results = {k: [] for k in models}
        times = {k: [] for k in models}
        for i, rec in enumerate(tqdm(records, desc="images", unit="img")):
            img = read_image(rec["file_name"], cfg.INPUT.FORMAT)
            x = torch.as_tensor(np.ascontiguousarray(resize.get_transform(img).apply_image(img).transpose(2, 0, 1)))
            for name, model in models.items():
                t0 = time.perf_counter()
                inst = model(x, output_size=img.shape[:2])["instances"]
                if i < args.num_timed:
                    times[name].append(time.perf_counter() - t0)
                for (x0, y0, x1, y1), s, c in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(),
                                                  inst.pred_classes.tolist()):
                    results[name].append(dict(image_id=rec["image_id"], category_id=to_dataset_id[c], score=s,
                                              bbox=[x0, y0, x1 - x0, y1 - y0]))

    print(f"{dataset}: {len(records)} images evaluated, {min(args.num_timed, len(records))} timed, "
          f"{args.threads} thread(s), quantized ops {args.ops}, {args.num_calibration} calibration images")
    print("| runtime | precision | AP | AP50 | ms/image (median) | images/s | ratio to fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        ap = evaluate_results(results[name], dataset)
        med = statistics.median(times[name])
        base = statistics.median(times[name.replace("int8", "fp32")])
        rt, prec = name.split()
        print(f"| {rt} | {prec} | {ap['AP']:.1f} | {ap['AP50']:.1f} | {1e3 * med:.1f} | "
              f"{1 / med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
