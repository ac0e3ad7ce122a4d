"""Soft-NMS speed: ours vs ensemble-boxes' soft_nms and torchvision's hard batched_nms, one call per image.

    python benchmarks/soft_nms.py --threads 1            # operator + end-to-end inference
    python benchmarks/soft_nms.py --threads 1 --skip-e2e

Inputs: ``--images`` images x ``--boxes`` candidate boxes x ``--classes`` classes (boxes clustered around a few
objects per image, as the ROI heads' class-specific candidates are), called once per image as the ROI heads
do. Reported (ratios of medians, interleaved repeats, see ``common.py``):

- ours (the device's default path) vs ``ensemble_boxes.soft_nms`` (target: >= 20x faster, i.e. ratio <= 0.05);
- ours vs ``torchvision.ops.batched_nms`` (targets: linear <= 1.0x, gaussian <= 2.0x);
- the vectorised torch path (the CUDA path) on the same device, for information;
- end-to-end inference of the small config (``configs/synthetic/cascade_r18_cpu.yaml`` as it is:
  DefectCascadeROIHeads, random weights, ``SCORE_THRESH_TEST`` 0.001 so that the NMS gets many candidates) on
  the first ``--e2e-images`` images of its test set, soft-NMS vs hard NMS (target <= 1.05x).
"""
import os
import sys

import numpy as np
import torch
import torchvision
from ensemble_boxes import soft_nms as eb_soft_nms

from common import base_parser, compare, print_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))  # before d2_defects registers them

from d2_defects.layers.soft_nms import batched_soft_nms  # noqa: E402


def make_images(num_images, num_boxes, num_classes, device, seed=0, size=800.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        num_obj = 20
        centers = torch.rand(num_obj, 2, generator=g) * (size - 200) + 100
        sizes = torch.rand(num_obj, 2, generator=g) * 150 + 10
        k = torch.randint(0, num_obj, (num_boxes,), generator=g)
        c = centers[k] + torch.randn(num_boxes, 2, generator=g) * sizes[k] * 0.15
        wh = sizes[k] * (1 + 0.15 * torch.randn(num_boxes, 2, generator=g)).clamp(min=0.3)
        boxes = torch.cat([c - wh / 2, c + wh / 2], 1).clamp(0, size)
        scores = torch.rand(num_boxes, generator=g)
        classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        out.append((boxes.to(device), scores.to(device), classes.to(device)))
    return out, size


def run_ours(data, method, iou, sigma, thr, backend=None):
    return lambda: [batched_soft_nms(b, s, c, method, sigma, iou, thr, backend=backend) for b, s, c in data]


def run_eb(data_np, method, iou, sigma, thr):
    m = {"linear": 1, "gaussian": 2}[method]
    return lambda: [eb_soft_nms([b], [s], [c], method=m, iou_thr=iou, sigma=sigma, thresh=thr) for b, s, c in data_np]


def run_tv(data, iou):
    return lambda: [torchvision.ops.batched_nms(b, s, c, iou) for b, s, c in data]


def end_to_end(args):
    import itertools

    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    from d2_defects.engine.launch import load_config

    def build(*opts):
        # the small config as-is (DefectCascadeROIHeads), random init; SCORE_THRESH_TEST low so that the NMS
        # sees about POST_NMS_TOPK_TEST x classes candidates per image, like a trained model's low-score tail
        cfg = load_config(os.path.join(ROOT, "configs/synthetic/cascade_r18_cpu.yaml"), [
            "MODEL.DEVICE", args.device, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.e2e_score_thresh), *opts])
        torch.manual_seed(0)
        return build_model(cfg).eval(), cfg

    hard, cfg = build()
    soft, _ = build("MODEL.SOFT_NMS.ENABLED", "True", "MODEL.SOFT_NMS.METHOD", args.e2e_method)
    cand, _ = build("MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0", "TEST.DETECTIONS_PER_IMAGE", "-1")  # no suppression
    soft.load_state_dict(hard.state_dict())
    cand.load_state_dict(hard.state_dict())
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    inputs = [batch for batch in itertools.islice(loader, args.e2e_images)]

    def infer(model):
        def fn():
            with torch.no_grad():
                return [model(x) for x in inputs]
        return fn

    def count(model):
        return sum(len(o[0]["instances"]) for o in infer(model)()) / len(inputs)

    print(f"end-to-end: {len(inputs)} images of {cfg.DATASETS.TEST[0]}, per image: {count(cand):.0f} candidates "
          f"before NMS, detections hard {count(hard):.0f}, soft-NMS ({args.e2e_method}) {count(soft):.0f} "
          f"(TEST.DETECTIONS_PER_IMAGE {cfg.TEST.DETECTIONS_PER_IMAGE})")
    return compare(f"e2e inference ({cfg.MODEL.ROI_HEADS.NAME}, {len(inputs)} val images), "
                   f"soft-NMS {args.e2e_method} vs hard NMS",
                   infer(hard), infer(soft), repeats=args.repeats, warmup=1, device=args.device)


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--boxes", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--score-thresh", type=float, default=0.001)
    p.add_argument("--eb-repeats", type=int, default=3, help="repeats of the (slow) ensemble-boxes comparison")
    p.add_argument("--torch-images", type=int, default=10, help="images for the torch-path-on-this-device rows")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--e2e-images", type=int, default=10)
    p.add_argument("--e2e-method", default="linear")
    p.add_argument("--e2e-score-thresh", type=float, default=0.001, help="MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")

    data, size = make_images(args.images, args.boxes, args.classes, args.device)
    data_np = [((b / size).double().cpu().numpy(), s.double().cpu().numpy(), c.cpu().numpy()) for b, s, c in data]
    kw = dict(iou=args.iou, sigma=args.sigma, thr=args.score_thresh)
    kept = {m: np.mean([len(batched_soft_nms(b, s, c, m, args.sigma, args.iou, args.score_thresh)[0])
                        for b, s, c in data]) for m in ("linear", "gaussian", "hard")}
    print(f"{args.images} images x {args.boxes} boxes x {args.classes} classes on {args.device}, "
          f"{torch.get_num_threads()} thread(s); mean kept per image: {kept}")

    rows = []
    for m in ("linear", "gaussian"):
        rows.append(compare(f"{m}: ours vs ensemble_boxes.soft_nms ({args.images} images)",
                            run_eb(data_np, m, **kw), run_ours(data, m, **kw),
                            repeats=args.eb_repeats, warmup=1, device=args.device))
    for m in ("linear", "gaussian", "hard"):
        rows.append(compare(f"{m}: ours vs torchvision batched_nms ({args.images} images)",
                            run_tv(data, args.iou), run_ours(data, m, **kw),
                            repeats=args.repeats, warmup=args.warmup, device=args.device))
    few = data[: args.torch_images]
    for m in ("linear", "gaussian"):
        rows.append(compare(f"{m}: torch (CUDA) path on {args.device} vs torchvision batched_nms ({len(few)} images)",
                            run_tv(few, args.iou), run_ours(few, m, **kw, backend="torch"),
                            repeats=max(3, args.repeats // 3), warmup=1, device=args.device))
    if not args.skip_e2e:
        rows.append(end_to_end(args))
    print_table(rows, title=f"Soft-NMS (`python benchmarks/soft_nms.py {' '.join(sys.argv[1:])}`)")


if __name__ == "__main__":
    main()
