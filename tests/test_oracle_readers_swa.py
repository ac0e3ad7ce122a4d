"""Oracles the earlier tests left open: the VOC reader against Detectron2's load_voc_instances, SWA's BatchNorm
recompute against the population statistics (and torch.optim.swa_utils.update_bn), and two CPU processes holding
the same weights after training."""
import os

import pytest
import torch
from torch import nn

from data_helpers import CLASSES, GT, write_images, write_voc_by_hand
from d2_defects.data.formats import read_voc
from d2_defects.engine.swa import SWAHook


def test_voc_reader_matches_detectron2_load_voc_instances(tmp_path):
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    root = tmp_path / "VOC"
    write_voc_by_hand(str(root / "Annotations"), ext=".jpg")
    write_images(str(root / "JPEGImages"), ext=".jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(GT) + "\n")
    ref = {d["image_id"]: d for d in load_voc_instances(str(root), "trainval", CLASSES)}
    ours = read_voc(str(root / "Annotations"), str(root / "JPEGImages"), classes=CLASSES)
    names = {c["id"]: c["name"] for c in ours["categories"]}
    assert [names[i] for i in sorted(names)] == CLASSES
    by_image = {}
    for im in ours["images"]:
        by_image[os.path.splitext(im["file_name"])[0]] = (im, [])
    for a in ours["annotations"]:
        im = next(v for v in by_image.values() if v[0]["id"] == a["image_id"])
        x, y, w, h = a["bbox"]
        im[1].append((names[a["category_id"]], [x, y, x + w, y + h]))
    assert set(by_image) == set(ref)
    n = 0
    for stem, d in ref.items():
        im, boxes = by_image[stem]
        assert (im["width"], im["height"]) == (d["width"], d["height"])
        expected = sorted((CLASSES[a["category_id"]], a["bbox"]) for a in d["annotations"])
        got = sorted(boxes)
        assert [c for c, _ in got] == [c for c, _ in expected]
        for (_, b), (_, e) in zip(got, expected):
            assert b == pytest.approx(e, abs=1e-9)
            n += 1
    assert n == sum(len(b) for _, _, b in GT.values())


def test_swa_bn_recompute_gives_population_statistics():
    """The hook's BN recompute (fvcore's update_bn_stats) gives each BN layer the mean and the population
    variance of all its inputs over the batches; torch.optim.swa_utils.update_bn gives the same means, and as
    variance the average of the per-batch variances (which leaves out how much the batch means differ)."""
    import copy

    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 12, 12, generator=g) * 3 + k for k in range(7)]  # batch means differ
    ours, ref = net, copy.deepcopy(net)
    # the inputs every BN layer sees in training mode (with batch statistics), captured on a copy
    seen = {1: [], 4: []}
    probe = copy.deepcopy(net).train()
    for i in seen:
        probe[i].register_forward_pre_hook(lambda m, x, i=i: seen[i].append(x[0].detach()))
    with torch.no_grad():
        for b in batches:
            probe(b)
    SWAHook(ours, start_iter=0, num_cycles=1, cycle_iters=1, bn_data_loader=batches,
            bn_update_iters=len(batches))._update_bn(ours)
    update_bn(batches, ref)
    for i, xs in seen.items():
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1).double()
        assert torch.allclose(ours[i].running_mean.double(), x.mean(1), atol=1e-5)
        assert torch.allclose(ours[i].running_var.double(), x.var(1, unbiased=False), rtol=1e-5)
        assert torch.allclose(ref[i].running_mean, ours[i].running_mean, atol=1e-5)
        per_batch = torch.stack([v.transpose(0, 1).reshape(v.shape[1], -1).var(1, unbiased=True) for v in xs])
        assert torch.allclose(ref[i].running_var, per_batch.mean(0), rtol=1e-4)


RANK_SCRIPT = '''
import sys
import torch
from detectron2.engine import launch
from detectron2.utils import comm
import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config
from d2_defects.engine.swa import unwrap_model
from d2_defects.engine.trainer import Trainer

def main(out, opts):
    cfg = load_config(sys.argv[2], opts)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.train()
    torch.save(unwrap_model(trainer.model).state_dict(), f"{out}/rank{comm.get_rank()}.pth")

if __name__ == "__main__":
    launch(main, 2, dist_url="auto", args=(sys.argv[1], sys.argv[3:]))
'''


def test_two_cpu_processes_keep_the_weights_synchronised(synthetic_root, tmp_path):
    """DDP on CPU (gloo): after a few steps on different batches, both ranks hold the same parameters."""
    import subprocess
    import sys

    from conftest import ROOT, SMALL_CONFIG, TINY_OPTS

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TRAIN",
            "('synthetic_defects_train',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), SMALL_CONFIG, *opts], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        assert torch.equal(r0[k], r1[k]), k
