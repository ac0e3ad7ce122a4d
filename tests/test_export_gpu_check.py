"""benchmarks/gpu_check.py runs small on CPU (so that it cannot rot before the next GPU run)."""
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def test_gpu_check_runs_small_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--threads", "2", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(r["ok"] for r in rows), rows
    checks = [r["check"] for r in rows]
    # (a) both soft-NMS paths agree at both sizes, and are timed against hard NMS
    identical = [r for r in rows if r["check"].startswith("(a) soft-NMS torch")]
    assert len(identical) == 2 and all("identical: True" in r["detail"] for r in identical)
    assert sum(c.startswith("(a) linear soft-NMS vs batched_nms") for c in checks) == 2
    # (b) fp32 and AMP train steps with the IoU branch, losses finite
    amp = next(r for r in rows if "with AMP" in r["check"])
    assert "losses finite" in amp["detail"]
    # (c) every GPU config, (d) DCN against the float64 reference
    gpu_configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs", "gpu")) if f.endswith(".yaml"))
    assert [c.split()[-1] for c in checks if c.startswith("(c)")] == gpu_configs
    assert any(c.startswith("(d) DCNv2 forward+backward") for c in checks)
    assert "| check | result | detail |" in proc.stdout


def test_gpu_check_without_cuda_is_one_error_line():
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a GPU machine
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cuda"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("ERROR: --device cuda")
