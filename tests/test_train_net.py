"""End-to-end: train_net.py trains, evaluates, resumes, evaluates checkpoints, and runs 2 CPU processes."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS, run_train_net

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]
# a 4-iteration model scores most candidates low: keep them, so that the evaluations have detections to compare
EVAL_OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001"]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, *EVAL_OPTS, "SOLVER.MAX_ITER", "4",
                   "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)], synthetic_root)
    return out


def _bbox(results_file):
    with open(results_file) as f:
        return json.load(f)["bbox"]


def _detections(output_dir):
    with open(os.path.join(output_dir, "inference", "synthetic_defects_val", "coco_instances_results.json")) as f:
        return json.load(f)


def test_training_writes_checkpoints_metrics_and_eval(trained):
    for name in ("model_final.pth", "model_0000001.pth", "last_checkpoint", "metrics.json", "eval_results.json",
                 "eval_tables.md", "config.yaml"):
        assert (trained / name).exists(), name
    assert (trained / "last_checkpoint").read_text() == "model_final.pth"
    assert set(_bbox(trained / "eval_results.json")) >= {"AP", "AP50", "AP-scratch", "AP-hole"}
    ckpt = torch.load(trained / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == 3
    assert not list(trained.glob("*.tmp-*"))


def test_eval_only_reproduces_in_training_metrics(trained, synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *DS, *EVAL_OPTS,
                          "MODEL.WEIGHTS", str(trained / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)],
                         synthetic_root)
    a, b = _bbox(trained / "eval_results.json"), _bbox(tmp_path / "eval_results.json")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
    # the same detections, not only the same (possibly all-zero) metrics
    ours, ref = _detections(tmp_path), _detections(trained)
    assert len(ref) > 0 and len(ours) == len(ref)
    for d, r in zip(ours, ref):
        assert (d["image_id"], d["category_id"]) == (r["image_id"], r["category_id"])
        assert d["bbox"] == pytest.approx(r["bbox"], abs=1e-4)
        assert d["score"] == pytest.approx(r["score"], abs=1e-5)
    # --eval-only prints the COCO tables (overall and per class) with the metrics it wrote
    log = proc.stdout
    assert "Evaluation results for bbox" in log and "Per-category bbox AP" in log
    table = log[log.index("Evaluation results for bbox"):]
    header = table.splitlines()[1]
    assert [c.strip() for c in header.strip("|").split("|")] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    row = [float(c) for c in table.splitlines()[3].strip("|").split("|")]
    assert row == pytest.approx([b[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")], abs=1e-3,
                                nan_ok=True)


def test_resume_continues_from_last_iteration(trained, synthetic_root, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained, out)
    (out / "last_checkpoint").write_text("model_0000001.pth")
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--resume", *TINY_OPTS, *DS, "SOLVER.MAX_ITER", "6",
                          "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)], synthetic_root)
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 2" in log
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 5


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_eval_only_bad_checkpoint_is_one_line(synthetic_root, tmp_path, trained, content):
    path = tmp_path / "model_final.pth"
    if content is None:  # truncated copy of a real checkpoint
        path.write_bytes((trained / "model_final.pth").read_bytes()[:5000])
    else:
        path.write_bytes(content)
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *DS, "MODEL.WEIGHTS",
                          str(path), "OUTPUT_DIR", str(tmp_path / "o")], synthetic_root, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 1 and str(path) in errors[0]


def test_eval_only_missing_checkpoint(synthetic_root, tmp_path):
    missing = tmp_path / "nope" / "model_final.pth"
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *DS, "MODEL.WEIGHTS",
                          str(missing), "OUTPUT_DIR", str(tmp_path / "o")], synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint not found: {missing}" in proc.stderr


def test_config_key_typo_is_one_line(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "SOLVER.MAX_ITERS", "3", "OUTPUT_DIR", str(tmp_path)],
                         synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Non-existent key: SOLVER.MAX_ITERS (did you mean SOLVER.MAX_ITER?)" in proc.stderr
    (tmp_path / "typo.yaml").write_text(f"_BASE_: {SMALL_CONFIG}\nSOLVER:\n  BASE_LRR: 0.1\n")
    proc = run_train_net(["--config-file", tmp_path / "typo.yaml"], synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"config error in {tmp_path / 'typo.yaml'}" in proc.stderr and "SOLVER.BASE_LRR" in proc.stderr


@pytest.mark.parametrize("heads,key,value", [
    ("CascadeROIHeads", "MODEL.SOFT_NMS.ENABLED", "True"),
    ("StandardROIHeads", "MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", "[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]"),
])
def test_postprocess_keys_with_stock_heads_are_one_line_errors(synthetic_root, tmp_path, heads, key, value):
    # Detectron2's stock heads have no project postprocessing: the key would be silently ignored
    proc = run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, "SOLVER.MAX_ITER", "1",
                          "MODEL.ROI_HEADS.NAME", heads, key, value, "OUTPUT_DIR", str(tmp_path)],
                         synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: config error: ")
    assert key in errors[0] and heads in errors[0] and "would be ignored" in errors[0]
    assert not (tmp_path / "model_final.pth").exists()


def test_two_cpu_processes_train(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *DS,
                          "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)],
                         synthetic_root)
    assert (tmp_path / "model_final.pth").exists()
    assert "Rank of current process: 0. World size: 2" in proc.stdout
    # rank 1 logs to its own file: it joined the same 2-process group and ran the training loop to the end
    rank1 = (tmp_path / "log.txt.rank1").read_text()
    assert "Rank of current process: 1. World size: 2" in rank1
    assert "Starting training from iteration 0" in rank1 and "Overall training speed: " in rank1


def test_visualize_results_draws_pngs(trained, synthetic_root, tmp_path):
    results = os.path.join(trained, "inference", "synthetic_defects_val", "coco_instances_results.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "visualize_results.py"), "--dataset", "synthetic_defects_val",
         "--results", results, "--output", str(tmp_path / "png"), "--num-images", "3", "--score-threshold", "0"],
        cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=synthetic_root), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3 and "wrote 3 images" in proc.stdout
    for p in pngs:
        img = cv2.imread(str(p))
        assert p.stat().st_size > 0 and img is not None and img.shape[1] % 2 == 0
        left, right = np.split(img, 2, axis=1)  # ground truth | predictions
        assert not np.array_equal(left, right)
