"""End-to-end: train_net.py trains, evaluates, resumes, evaluates checkpoints, and runs 2 CPU processes."""
import json
import os

import pytest
import torch

from conftest import SMALL_CONFIG, TINY_OPTS, run_train_net

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, "SOLVER.MAX_ITER", "4",
                   "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)], synthetic_root)
    return out


def _bbox(results_file):
    with open(results_file) as f:
        return json.load(f)["bbox"]


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
    run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *DS,
                   "MODEL.WEIGHTS", str(trained / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)], synthetic_root)
    a, b = _bbox(trained / "eval_results.json"), _bbox(tmp_path / "eval_results.json")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k


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


def test_two_cpu_processes_train(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *DS,
                          "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)],
                         synthetic_root)
    assert (tmp_path / "model_final.pth").exists()
    assert "world size: 2" in (proc.stdout + proc.stderr).lower() or "rank 1" in (proc.stdout + proc.stderr)
