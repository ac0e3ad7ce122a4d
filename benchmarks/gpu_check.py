"""GPU check: the CUDA paths of the project, measured and checked in one run of a few minutes.

    python benchmarks/gpu_check.py --device cuda --output gpu_check.json     # on a GPU machine
    python benchmarks/gpu_check.py --device cpu                              # small, on CPU (tested)

(a) soft-NMS: the vectorised torch path on the device against the numba path on CPU on the same boxes
    (identical keep set, order and scores), and linear soft-NMS timed against ``torchvision.ops.batched_nms``
    (target: <= 1x hard NMS's time) at 2,000 and 20,000 boxes (CPU: 200 and 2,000);
(b) an R50-FPN Cascade R-CNN train step (configs/gpu/cascade_R50_FPN_1x.yaml with the IoU branch on, random
    init with BatchNorm since no pretrained weights are assumed) with and without ``SOLVER.AMP.ENABLED``:
    time per step, and every loss (box, IoU branch, RPN) finite under fp16 autocast (CPU: bf16);
(c) inference time per image of every config in configs/gpu/ (random init, random images at the test size);
(d) deformable convolution (DCNv2, ``torchvision.ops.deform_conv2d`` as the DCN backbone uses it) forward
    and backward on the device against a float64 CPU reference.

Prints one table; exits 1 when a check fails (a mismatch, a non-finite loss, an error), 0 otherwise. Timing
targets are reported (``target met`` / ``target missed``), they do not fail the run. See docs/deploy.md for
running it on a GPU machine with an existing PyTorch.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# small sizes for --device cpu (a test runs it); full sizes on CUDA
SIZES = {
    "cuda": dict(nms_boxes=(2000, 20000), train_size=800, train_max=1333, train_batch=2, test_size=800,
                 test_max=1333, repeats=10, warmup=3, dcn=(4, 64, 128, 128)),
    "cpu": dict(nms_boxes=(200, 2000), train_size=96, train_max=128, train_batch=2, test_size=64, test_max=96,
                repeats=1, warmup=0, dcn=(2, 8, 24, 24)),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _boxes(n, num_classes, device, seed=0, size=800.0):
    """Boxes clustered around 20 objects (the ROI heads' class-specific candidates look like this)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(20, 2, generator=g) * (size - 200) + 100
    wh = torch.rand(20, 2, generator=g) * 150 + 10
    k = torch.randint(0, 20, (n,), generator=g)
    c = centers[k] + torch.randn(n, 2, generator=g) * 8
    s = wh[k] * (1 + 0.1 * torch.randn(n, 2, generator=g))
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, num_classes, (n,), generator=g)
    return boxes.to(device), scores.to(device), idxs.to(device)


def check_soft_nms(device, sizes):
    from d2_defects.layers.soft_nms import batched_soft_nms

    rows = []
    for n in sizes["nms_boxes"]:
        boxes, scores, idxs = _boxes(n, 10, device)
        keep_t, s_t = batched_soft_nms(boxes, scores, idxs, method="linear", iou_threshold=0.5, backend="torch")
        keep_n, s_n = batched_soft_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), method="linear", iou_threshold=0.5,
                                       backend="numba")
        same = torch.equal(keep_t.cpu(), keep_n) and torch.equal(s_t.cpu(), s_n)
        soft = _median_time(lambda: batched_soft_nms(boxes, scores, idxs, method="linear", iou_threshold=0.5),
                            device, sizes["repeats"], sizes["warmup"])
        hard = _median_time(lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5), device,
                            sizes["repeats"], sizes["warmup"])
        rows.append(dict(check=f"(a) soft-NMS torch ({device.type}) vs numba (cpu), {n} boxes",
                         ok=same, detail=f"{len(keep_t)} kept, keep set/order/scores identical: {same}"))
        rows.append(dict(check=f"(a) linear soft-NMS vs batched_nms, {n} boxes", ok=True,
                         detail=f"{soft * 1e3:.2f} ms vs {hard * 1e3:.2f} ms = {soft / hard:.2f}x "
                                f"(target <= 1x: {'target met' if soft <= hard else 'target missed'})"))
    return rows


def _train_batch(cfg, device, sizes, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = sizes["train_size"], sizes["train_max"]
    batch = []
    for _ in range(sizes["train_batch"]):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
                         gt_classes=torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (3,), generator=g))
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def check_train_step(device, sizes):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2_defects.config import load_config

    opts = ["MODEL.DEVICE", device.type, "MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED", "True",
            # random init: BatchNorm trains from scratch (FrozenBN diverges without pretrained weights)
            "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"]
    if device.type == "cpu":
        opts += ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                 "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32"]
    rows = []
    times = {}
    for amp in (False, True):
        cfg = load_config(os.path.join(ROOT, "configs", "gpu", "cascade_R50_FPN_1x.yaml"),
                          opts + ["SOLVER.AMP.ENABLED", str(amp)])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        # what detectron2's AMPTrainer does: fp16 autocast and a gradient scaler on CUDA (bf16 on CPU)
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        batch = _train_batch(cfg, device, sizes)
        nonfinite = set()
        seen = set()

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=cfg.SOLVER.AMP.ENABLED):
                losses = model(batch)
            seen.update(losses)
            nonfinite.update(k for k, v in losses.items() if not torch.isfinite(v).all())
            opt.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt)
            scaler.update()

        with EventStorage():
            times[amp] = _median_time(step, device, sizes["repeats"], sizes["warmup"])
        name = "AMP (fp16)" if device.type == "cuda" else "AMP (bf16 on CPU)"
        rows.append(dict(check=f"(b) R50-FPN cascade train step, {'with ' + name if amp else 'fp32'}",
                         ok=not nonfinite and any(k.startswith("loss_iou") for k in seen),
                         detail=f"{times[amp] * 1e3:.0f} ms/step, batch {sizes['train_batch']} of "
                                f"{sizes['train_max']}x{sizes['train_size']}; losses "
                                + (f"NON-FINITE: {sorted(nonfinite)}" if nonfinite else f"finite ({len(seen)} terms)")))
        model = opt = None  # free the device memory before the next model
    rows.append(dict(check="(b) AMP / fp32 train step time", ok=True, detail=f"{times[True] / times[False]:.2f}x"))
    return rows


def check_inference(device, sizes):
    from detectron2.modeling import build_model

    from d2_defects.config import load_config

    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "gpu", "*.yaml"))):
        opts = ["MODEL.DEVICE", device.type, "INPUT.MIN_SIZE_TEST", str(sizes["test_size"]), "INPUT.MAX_SIZE_TEST",
                str(sizes["test_max"])]
        cfg = load_config(path, opts)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        image = torch.randint(0, 256, (3, sizes["test_size"], sizes["test_max"]), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))

        def infer():
            with torch.no_grad():
                return model([{"image": image}])

        n = len(infer()[0]["instances"])
        t = _median_time(infer, device, sizes["repeats"], sizes["warmup"])
        rows.append(dict(check=f"(c) inference {os.path.basename(path)}", ok=True,
                         detail=f"{t * 1e3:.1f} ms/image at {sizes['test_max']}x{sizes['test_size']} ({n} detections)"))
        model = None
    return rows


def check_dcn(device, sizes):
    from detectron2.layers import Conv2d

    from d2_defects.modeling.backbone.resnet_dcn import ResNetDeformConv

    n, c, h, w = sizes["dcn"]
    torch.manual_seed(0)
    layer = ResNetDeformConv(Conv2d(c, c, 3, padding=1, bias=False), modulated=True)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.05)  # non-zero offsets and masks
    x = torch.randn(n, c, h, w)
    results = {}
    for name, dev, dtype in (("device", device, torch.float32), ("reference", torch.device("cpu"), torch.float64)):
        lay = ResNetDeformConv(Conv2d(c, c, 3, padding=1, bias=False), modulated=True).to(dev, dtype)
        lay.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
        xi = x.to(dev, dtype).clone().requires_grad_(True)
        out = lay(xi)
        out.square().sum().backward()
        results[name] = [t.detach().double().cpu() for t in (out, xi.grad, lay.weight.grad, lay.conv_offset.weight.grad)]
    diffs = [float(((a - b).abs() / (b.abs().max() + 1e-12)).max()) for a, b in zip(results["device"], results["reference"])]
    ok = all(d < 1e-3 for d in diffs)
    return [dict(check=f"(d) DCNv2 forward+backward on {device.type} vs float64 CPU", ok=ok,
                 detail="max relative difference output / input grad / weight grad / offset grad: "
                        + " / ".join(f"{d:.1e}" for d in diffs))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (small sizes)")
    p.add_argument("--output", default=None, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ERROR: --device cuda but torch.cuda.is_available() is False (use --device cpu for the small run)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sizes = SIZES[device.type]
    if device.type == "cuda":
        # exact fp32 comparisons (soft-NMS, DCN reference): no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import d2_defects  # noqa: F401  registers models

    rows = []
    for check in (check_soft_nms, check_train_step, check_inference, check_dcn):
        t0 = time.perf_counter()
        try:
            rows += check(device, sizes)
        except Exception as e:  # one failing check must not hide the others
            traceback.print_exc()
            rows.append(dict(check=check.__name__, ok=False, detail=f"{type(e).__name__}: {e}".splitlines()[0]))
        print(f"[gpu_check] {check.__name__} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    env = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
           + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"))
    print(f"\ngpu_check on {device.type}: {env}\n")
    print("| check | result | detail |\n|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {'ok' if r['ok'] else 'FAIL'} | {r['detail']} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=device.type, environment=env, rows=rows), f, indent=2)
    failed = [r["check"] for r in rows if not r["ok"]]
    if failed:
        print(f"\nFAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
