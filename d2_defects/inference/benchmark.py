"""One speed table for eager PyTorch and the exported runtimes (TorchScript, ONNX Runtime, OpenVINO).

Every backend times the same work: a model input (a (3, H, W) uint8 image already resized to the test
size) to final detections, post-processing included (``postprocess.py`` for the exported ones). The
backends take turns image by image (the order rotates every round), so that changes in machine load hit
them alike. Peak memory is measured per backend in a fresh process that loads only that backend and runs
it: the growth of its peak resident set size (CPU; CUDA: ``max_memory_allocated``) over the process after
its imports.
"""
import copy
import io
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from .export import FORMATS, ExportError, check_parity, export_model, load_exported, load_samples

__all__ = ["BACKENDS", "benchmark_backends", "format_table"]

BACKENDS = ("eager", "torchscript", "onnxruntime", "openvino")
_FORMAT = {"torchscript": "torchscript", "onnxruntime": "onnx", "openvino": "openvino"}
assert set(_FORMAT.values()) == set(FORMATS)


def _build_model(cfg):
    from detectron2.modeling import build_model

    from ..checkpoint import DefectCheckpointer

    torch.manual_seed(0)  # random init (no MODEL.WEIGHTS) is reproducible, and fine for timing
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DefectCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _inputs(cfg, size, n, seed=0):
    """``n`` random (3, H, W) uint8 model inputs of an image of ``size`` (W, H) resized like at test time."""
    from detectron2.data.transforms import ResizeShortestEdge

    rng = np.random.default_rng(seed)
    resize = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        out.append(torch.as_tensor(np.ascontiguousarray(resize.get_transform(img).apply_image(img).transpose(2, 0, 1))))
    return out


def _eager_runner(model):
    device = model.device

    def run(image):
        with torch.no_grad():
            out = model([{"image": image.to(device)}])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out[0]

    return run


def _state_dict_size(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _memory_probe(cfg, backend, export_dir, images, threads, queue):
    """Child process: peak memory growth (MB) of loading ``backend`` and running it on ``images``."""
    try:
        if threads:
            torch.set_num_threads(threads)
        import d2_defects  # noqa: F401  registers models

        cuda = backend == "eager" and torch.device(cfg.MODEL.DEVICE).type == "cuda"
        if not cuda:
            base = _rss_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        if backend == "eager":
            run = _eager_runner(_build_model(cfg))
        else:
            run = load_exported(os.path.join(export_dir, backend), _FORMAT[backend], threads=threads)
        for image in images:
            run(image)
        queue.put(torch.cuda.max_memory_allocated() / 2**20 if cuda else (_rss_kb("VmHWM") - base) / 1024)
    except Exception as e:  # reported in the table, the timings stay valid
        queue.put(f"n/a ({type(e).__name__})")


def _peak_memory(cfg, backend, export_dir, images, threads):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_probe, args=(cfg, backend, export_dir, images, threads, queue))
    proc.start()
    try:
        result = queue.get(timeout=600)
    except Exception:
        result = "n/a (timeout)"
    proc.join(timeout=60)
    return result


def benchmark_backends(cfg, backends=("eager",), sizes=((256, 192),), iters=10, warmup=2, threads=None,
                       export_dir=None, num_images=3, memory=True, atol=1e-3, score_atol=1e-4, image_spec=None):
    """
    Time ``backends`` (names of :data:`BACKENDS`) on the model of ``cfg`` (``MODEL.WEIGHTS``, or random
    init) at each image size, interleaved.

    Args:
        sizes: (W, H) image sizes; each is resized like at test time (``INPUT.MIN/MAX_SIZE_TEST``).
        iters, warmup: timed and untimed rounds per size; every round runs each backend once.
        threads (int): torch / ONNX Runtime / OpenVINO CPU threads (default: each library's own).
        export_dir (str): where the exported models are written (default: a temporary folder).
        num_images: random images per size, used in turn and for the parity check.
        memory (bool): measure peak memory per backend in a fresh process (slower).
        image_spec (str): instead of random images of ``sizes``, the first ``num_images`` images of this folder
            or glob (real images: a trained model's detections and so its post-processing cost are realistic),
            as one group labelled ``images``.
    Returns:
        list[dict]: one row per (size, backend): ``backend``, ``size`` "WxH", ``input`` "WxH" (model input),
        ``ms`` (median per image), ``images_per_s``, ``ratio`` (ms / eager's ms at that size, if timed),
        ``memory_mb`` (float or "n/a ..."), ``file_mb``, ``parity`` ("ok (max ... px)", "FAIL: ...", "reference").
    Raises:
        ValueError: unknown backend or bad counts; ExportError: a backend that cannot be exported.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"unknown backend(s) {unknown}, expected some of {BACKENDS}")
    if iters < 1 or warmup < 0 or num_images < 1:
        raise ValueError("iters and num_images must be >= 1, warmup >= 0")
    if image_spec:
        groups = [("images", load_samples(cfg, image_spec, num_images))]
    else:
        groups = [(f"{w}x{h}", _inputs(cfg, (w, h), num_images)) for w, h in sizes]
    if threads:
        torch.set_num_threads(threads)
    model = _build_model(cfg)
    cpu_model = model if model.device.type == "cpu" else copy.deepcopy(model).to("cpu")
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory()
        export_dir = tmp.name
    try:
        runners, file_mb = {}, {}
        for b in backends:
            if b == "eager":
                runners[b] = _eager_runner(model)
                file_mb[b] = (os.path.getsize(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else _state_dict_size(model)) / 2**20
                continue
            out = os.path.join(export_dir, b)
            export_model(cpu_model, groups[0][1][0], out, _FORMAT[b])
            runners[b] = load_exported(out, _FORMAT[b], threads=threads)
            file_mb[b] = runners[b].file_size() / 2**20

        rows = []
        for label, images in groups:
            parity = {b: "reference" if b == "eager" else _parity(cpu_model, runners[b], images, atol, score_atol)
                      for b in backends}
            times = {b: [] for b in backends}
            order = list(backends)
            for r in range(warmup + iters):
                image = images[r % len(images)]
                for b in order:
                    t0 = time.perf_counter()
                    runners[b](image)
                    if r >= warmup:
                        times[b].append(time.perf_counter() - t0)
                order = order[1:] + order[:1]
            medians = {b: statistics.median(t) for b, t in times.items()}
            for b in backends:
                mem = _peak_memory(cfg, b, export_dir, images, threads) if memory else "not measured"
                rows.append(dict(
                    backend=b, size=label, input=f"{images[0].shape[2]}x{images[0].shape[1]}",
                    ms=medians[b] * 1e3, images_per_s=1.0 / medians[b],
                    ratio=medians[b] / medians["eager"] if "eager" in medians else None,
                    memory_mb=mem, file_mb=file_mb[b], parity=parity[b]))
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def _parity(model, runner, images, atol, score_atol):
    try:
        r = check_parity(model, runner, images, atol, score_atol)
    except ExportError as e:
        return f"FAIL: {e}"
    return f"ok ({r['max_box_diff']:.1e} px, score {r['max_score_diff']:.1e})"


def format_table(rows):
    """Markdown table of :func:`benchmark_backends` rows."""
    lines = ["| backend | image size | model input | ms/image (median) | images/s | vs eager | peak memory (MB) "
             "| model file (MB) | parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        mem = f"{r['memory_mb']:.0f}" if isinstance(r["memory_mb"], float) else r["memory_mb"]
        lines.append(f"| {r['backend']} | {r['size']} | {r['input']} | {r['ms']:.1f} | {r['images_per_s']:.2f} | "
                     f"{ratio} | {mem} | {r['file_mb']:.1f} | {r['parity']} |")
    return "\n".join(lines)
