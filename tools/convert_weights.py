#!/usr/bin/env python
"""Convert weights into a checkpoint this project's models load with MODEL.WEIGHTS.

    # torchvision ImageNet ResNet/ResNeXt -> Detectron2 backbone names; prints the config lines to set
    python tools/convert_weights.py --from torchvision resnet50-0676ba61.pth r50_tv.pth
    # timm checkpoint -> the project's timm backbone (MODEL.BACKBONE.NAME build_timm_fpn_backbone)
    python tools/convert_weights.py --from timm convnext_tiny.safetensors cnx.pth \
        --config-file configs/gpu/cascade_convnext_tiny_FPN_1x.yaml
    # a detector checkpoint -> another class list and/or another number of cascade stages
    python tools/convert_weights.py --from detectron2 output/a/model_final.pth init.pth --num-classes 4 \
        --class-map scratch:scratch,crack:crack --old-dataset synthetic_defects_train --new-dataset my_train \
        --manifest my_datasets.yaml
    python tools/convert_weights.py --from detectron2 model_final.pth init_4stage.pth --stages 4

The output holds only the model weights ({"model": ...}; optimizer, scheduler and iteration are dropped), so
training from it starts at iteration 0. Use it with MODEL.WEIGHTS OUTPUT (not --resume).
"""
import argparse
import os
import sys

import torch

import d2_defects  # noqa: F401  registers datasets and backbones
from d2_defects.modeling.convert import (
    parse_class_map,
    read_state_dict,
    remap_classes,
    set_cascade_stages,
    timm_to_d2,
    torchvision_resnet_to_d2,
)
from d2_defects.utils.errors import UsageError, run_cli
from d2_defects.utils.fileio import atomic_write, check_can_write


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["torchvision", "timm", "detectron2"],
                   help="what INPUT is: a torchvision ResNet/ResNeXt state dict, a timm checkpoint "
                        "(.pth/.safetensors), or a Detectron2/d2_defects checkpoint (.pth/.pkl)")
    p.add_argument("input", help="checkpoint to convert")
    p.add_argument("output", help="where to write the converted checkpoint (.pth)")
    p.add_argument("--config-file", default="",
                   help="timm: the config whose MODEL.TIMM.* backbone receives the weights")
    p.add_argument("--prefix", default=None,
                   help="name prefix of the backbone in the detector (default: backbone.bottom_up. for "
                        "torchvision, backbone.bottom_up.model. for timm)")
    p.add_argument("--num-classes", type=int, default=None, help="detectron2: number of classes of the new model")
    p.add_argument("--class-map", default="",
                   help="detectron2: old:new,... class indices, or names with --old-dataset/--new-dataset "
                        "(default: by name when both datasets are given, else old class i -> new class i)")
    p.add_argument("--old-dataset", default="", help="registered dataset the checkpoint was trained on (names)")
    p.add_argument("--new-dataset", default="", help="registered dataset the new model trains on (names)")
    p.add_argument("--manifest", default="", help="datasets manifest (YAML) that registers --old/--new-dataset")
    p.add_argument("--stages", type=int, default=None, help="detectron2: number of cascade stages of the new model")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE) for --config-file")
    return p.parse_args(argv)


def _class_names(name):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise UsageError(f"dataset {name!r} is not registered (is DETECTRON2_DATASETS set?)")
    DatasetCatalog.get(name)  # sets thing_classes for datasets registered lazily
    return list(MetadataCatalog.get(name).thing_classes)


def convert(args):
    check_can_write(args.output, args.overwrite)
    sd, _ = read_state_dict(args.input)
    if args.manifest:
        from d2_defects.data import register_manifest

        register_manifest(args.manifest)
    lines = []
    if args.source == "torchvision":
        prefix = "backbone.bottom_up." if args.prefix is None else args.prefix
        out, lines = torchvision_resnet_to_d2(sd, prefix)
        print(f"{len(out)} tensors renamed for Detectron2's ResNet (prefix {prefix!r})")
    elif args.source == "timm":
        if not args.config_file:
            raise UsageError("--from timm needs --config-file (the config of the timm backbone)")
        from d2_defects.engine.launch import load_config
        from d2_defects.modeling.backbone.timm_backbone import TimmBackbone

        cfg = load_config(args.config_file, args.opts)
        backbone = TimmBackbone(cfg.MODEL.TIMM.NAME, list(cfg.MODEL.TIMM.OUT_INDICES))
        prefix = "backbone.bottom_up.model." if args.prefix is None else args.prefix
        out, dropped, missing = timm_to_d2(sd, backbone.model.state_dict(), prefix)
        print(f"{len(out)} tensors for {cfg.MODEL.TIMM.NAME}; dropped {len(dropped)} not in the features-only "
              f"model ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}); "
              f"missing {len(missing)}")
    else:
        out = sd
        if args.num_classes is None and (args.class_map or args.new_dataset):
            if not args.new_dataset:
                raise UsageError("--class-map needs --num-classes (or --new-dataset to count them)")
        if args.num_classes is not None or args.new_dataset:
            old_names = _class_names(args.old_dataset) if args.old_dataset else None
            new_names = _class_names(args.new_dataset) if args.new_dataset else None
            k = args.num_classes if args.num_classes is not None else len(new_names)
            if new_names is not None and len(new_names) != k:
                raise UsageError(f"--num-classes {k} but {args.new_dataset} has {len(new_names)} classes")
            if args.class_map:
                mapping = parse_class_map(args.class_map, old_names, new_names)
            elif old_names and new_names:
                mapping = {old_names.index(n): new_names.index(n) for n in new_names if n in old_names}
            else:
                mapping = None
            out, info = remap_classes(out, k, mapping)
            names = (lambda names, i: f"{i} ({names[i]})" if names else str(i))
            pairs = ", ".join(f"{names(old_names, o)} -> {names(new_names, n)}" for o, n in info["map"].items())
            print(f"classes {info['old_classes']} -> {info['new_classes']} in {', '.join(info['heads'])}: "
                  f"{pairs or 'none kept'}; other new classes freshly initialised")
            lines.append(f"MODEL.ROI_HEADS.NUM_CLASSES {k}   (MODEL.FCOS.NUM_CLASSES {k} for FCOS)")
        if args.stages is not None:
            out, old = set_cascade_stages(out, args.stages)
            print(f"cascade stages {old} -> {args.stages}" + (" (new stages copy the last one)"
                                                                 if args.stages > old else ""))
            lines.append(f"MODEL.ROI_BOX_CASCADE_HEAD.IOUS and BBOX_REG_WEIGHTS with {args.stages} entries each")
        if args.num_classes is None and not args.new_dataset and args.stages is None:
            print("no --num-classes/--class-map/--stages: only the model weights are kept")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    data = {"model": out, "__author__": f"d2_defects convert_weights --from {args.source}"}
    atomic_write(args.output, lambda f: torch.save(data, f))
    print(f"wrote {args.output}")
    if lines:
        print("set in your config (or on the command line):")
        for line in lines:
            print(f"  {line}")
    print(f"  MODEL.WEIGHTS {args.output}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run_cli(convert, args, exit=False)


if __name__ == "__main__":
    sys.exit(main())
