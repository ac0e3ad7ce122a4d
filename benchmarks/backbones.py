#!/usr/bin/env python
"""Train-step time of the backbones on the small Cascade R-CNN config, as ratios to plain ResNet-18.

Each candidate model (same config except the backbone) runs forward + backward + SGD step on the same fixed
batch of synthetic images; the timing is interleaved with the plain ResNet-18 baseline (benchmarks/common.py).

    python benchmarks/backbones.py --repeats 5 --size 160
"""
import os
import sys

import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from common import base_parser, compare, print_table

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")
DCN = ["MODEL.BACKBONE.NAME", "build_resnet_dcn_fpn_backbone", "MODEL.RESNETS.DEFORM_MODULATED", "True"]
TIMM = ["MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", "MODEL.TIMM.NAME"]
CANDIDATES = {
    "DCNv2 in res5": DCN + ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, True]"],
    "DCNv2 in res3-res5": DCN + ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]"],
    "DCNv1 in res3-res5": DCN[:2] + ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]"],
    "timm resnet18": TIMM + ["resnet18"],
    "timm convnext_atto": TIMM + ["convnext_atto", "MODEL.TIMM.OUT_INDICES", "[0, 1, 2, 3]"],
    "timm hrnet_w18_small_v2": TIMM + ["hrnet_w18_small_v2"],
}


def batch(size, n=2):
    gen = torch.Generator().manual_seed(0)
    h, w = size, size * 4 // 3
    out = []
    for i in range(n):
        inst = Instances((h, w), gt_boxes=Boxes(torch.tensor([[10.0, 12, 50, 30], [w / 2, h / 2, w / 2 + 8, h / 2 + 8]])),
                         gt_classes=torch.tensor([i % 6, 2]))
        out.append({"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst})
    return out


def train_step_fn(opts, device, data):
    # a small LR: the step costs the same, and hundreds of steps on one fixed batch from random init do not
    # diverge (at the config's 0.02 without warm-up the RPN blows up after a few dozen steps)
    cfg = load_config(CONFIG, ["MODEL.DEVICE", device, "SOLVER.BASE_LR", "0.0005", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    storage = EventStorage()

    def step():
        with storage:
            losses = model(data)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    return step


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160, help="image height in px (width = 4/3 of it)")
    p.add_argument("--only", nargs="*", default=None, help=f"candidates to run (default all: {list(CANDIDATES)})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = batch(args.size)
    baseline = train_step_fn([], args.device, data)
    rows = []
    for name, opts in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        rows.append(compare(f"train step, {name}", baseline, train_step_fn(opts, args.device, data),
                            repeats=args.repeats, warmup=args.warmup, device=args.device))
        print(rows[-1], file=sys.stderr, flush=True)
    print_table(rows, title=f"Backbones vs plain ResNet-18 (cascade_r18_cpu, 2 images {args.size}px, {args.device})")


if __name__ == "__main__":
    main()
