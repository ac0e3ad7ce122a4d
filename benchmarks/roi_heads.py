"""Cost of the project's ROI heads against Detectron2's stock cascade, and how well the IoU branch predicts IoU.

Timing (default): train step (forward + backward) and inference of ``DefectCascadeROIHeads`` with the IoU
branch, and without it, against the stock ``CascadeROIHeads``; same config, weights and batch, one process.

    python benchmarks/roi_heads.py --repeats 10 --threads 2

IoU correlation (``--iou-corr ITERS``): train a model with the IoU branch for ITERS iterations on the synthetic
data, then report the Pearson r between the predicted and the true IoU of the final detections on val
(true IoU: best IoU with a ground-truth box of the image), next to the r of the class score.

    DETECTRON2_DATASETS=datasets python benchmarks/roi_heads.py --iou-corr 300 --threads 2

With ``--weights model_final.pth`` (a model trained by ``train_net.py`` on the IoU config) the training is
skipped and the checkpoint is evaluated at the config's test size.
"""
import copy
import os

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from common import base_parser, compare, print_table  # benchmarks/common.py (the script's folder)
from d2_defects.engine.launch import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")


def small_opts(args):
    return ["MODEL.DEVICE", args.device, "INPUT.MIN_SIZE_TEST", str(args.size), "INPUT.MAX_SIZE_TEST",
            str(args.size * 2), "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN", str(args.size * 2)]


def fake_batch(n, size, device, seed=0):
    """``n`` images (size x 4/3 size) with 3 random boxes each, deterministic."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    batch = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 6
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
                         gt_classes=torch.randint(0, 6, (3,), generator=g))
        batch.append({"image": (torch.rand(3, h, w, generator=g) * 255).to(device), "instances": inst.to(device),
                      "height": h, "width": w})
    return batch


def timing(args):
    models = {}
    for key, opts in {
        "stock": ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"],
        "ours": ["MODEL.ROI_HEADS.NAME", "DefectCascadeROIHeads"],
        "ours_iou": ["MODEL.ROI_HEADS.NAME", "DefectCascadeROIHeads", "MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED", "True"],
    }.items():
        torch.manual_seed(0)
        models[key] = build_model(load_config(CONFIG, small_opts(args) + opts))
    for key in ("ours", "ours_iou"):  # same weights for every shared parameter
        models[key].load_state_dict(models["stock"].state_dict(), strict=False)
    batch = fake_batch(args.batch, args.size, args.device)
    test_batch = [{"image": d["image"]} for d in batch]

    def train_step(model):
        def fn():
            model.train()
            model.zero_grad(set_to_none=True)
            with EventStorage():
                torch.manual_seed(1)
                sum(model(batch).values()).backward()
        return fn

    def infer(model):
        def fn():
            model.eval()
            with torch.no_grad():
                model(test_batch)
        return fn

    kw = dict(repeats=args.repeats, warmup=args.warmup, device=args.device)
    rows = [
        compare("train step: ours + IoU branch vs stock cascade", train_step(models["stock"]),
                train_step(models["ours_iou"]), **kw),
        compare("train step: ours (IoU off) vs stock cascade", train_step(models["stock"]),
                train_step(models["ours"]), **kw),
        compare("inference: ours + IoU branch vs stock cascade", infer(models["stock"]), infer(models["ours_iou"]), **kw),
    ]
    print_table(rows, title=f"ROI heads, 3-stage cascade R18-FPN, batch {args.batch}, short side {args.size} px, "
                            f"{args.device}, {torch.get_num_threads()} threads")


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


def iou_correlation(args):
    from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
    from detectron2.data import transforms as T
    from torchvision.ops import box_iou
    from tqdm import tqdm

    config = os.path.join(ROOT, "configs", "synthetic", args.iou_config)
    opts = small_opts(args) + ["SOLVER.IMS_PER_BATCH", str(args.batch), "DATALOADER.NUM_WORKERS", "0",
                               "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05"]
    if args.weights:  # a trained checkpoint, evaluated at the config's own test size
        opts = ["MODEL.DEVICE", args.device, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05"]
    cfg = load_config(config, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.weights:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(args.weights)
        args.size = cfg.INPUT.MIN_SIZE_TEST
        args.iou_corr = 0
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loader = iter(build_detection_train_loader(cfg))
    model.train()
    with EventStorage() as storage:
        for it in tqdm(range(args.iou_corr), desc="train"):
            storage.iter = it
            for g in opt.param_groups:  # linear warm-up over the first 50 iterations
                g["lr"] = args.lr * min(1.0, (it + 1) / 50)
            losses = model(next(loader))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    model.eval()
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(args.size, cfg.INPUT.MAX_SIZE_TEST)],
                           image_format=cfg.INPUT.FORMAT)
    pred, score, true = [], [], []
    with torch.no_grad():
        for d in tqdm(DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.val_images], desc="val"):
            d = mapper(copy.deepcopy(d))
            inst = model([{"image": d["image"]}])[0]["instances"].to("cpu")
            if len(d["instances"]) == 0 or len(inst) == 0:
                continue
            true.append(box_iou(inst.pred_boxes.tensor, d["instances"].gt_boxes.tensor).max(1).values)
            pred.append(inst.pred_ious)
            score.append(inst.scores)
    pred, score, true = torch.cat(pred), torch.cat(score), torch.cat(true)
    what = args.weights or f"{args.iou_corr} iterations x {args.batch} images"
    print(f"\n{args.iou_config}, {what}, short side {args.size} px; "
          f"val detections (score >= 0.05): {len(true)}")
    print(f"Pearson r(predicted IoU, true IoU) = {pearson(pred, true):.3f}")
    print(f"Pearson r(final score, true IoU)   = {pearson(score, true):.3f}")


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160, help="short side of the images (px)")
    p.add_argument("--batch", type=int, default=2, help="images per batch")
    p.add_argument("--iou-corr", type=int, default=0, metavar="ITERS",
                   help="instead of timing: train ITERS iterations and report the IoU correlation on val")
    p.add_argument("--iou-config", default="faster_iou_r18_cpu.yaml", help="config under configs/synthetic/")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the --iou-corr training")
    p.add_argument("--val-images", type=int, default=200, help="val images used by --iou-corr")
    p.add_argument("--weights", default="", help="with --iou-corr: evaluate this trained checkpoint, no training")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iou_corr or args.weights:
        iou_correlation(args)
    else:
        timing(args)


if __name__ == "__main__":
    main()
