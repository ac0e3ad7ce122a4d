"""Export of the project's detectors to TorchScript, ONNX and OpenVINO, and the parity check against eager.

Every format is the same traced graph: one CHW image tensor (uint8, ``INPUT.FORMAT``, already resized to the
test size) in; out: ``boxes`` (N, 4) XYXY px, ``classes`` (N,), ``scores`` (N,), then the model's image-level
outputs (DefectRCNN: ``defect_score``, 0-dim). The graph stops before the final NMS: it returns every
candidate above the score thresholds, and ``postprocess.py`` (a numpy-only copy of
:mod:`d2_defects.inference.deploy_postprocess`) with ``postprocess.json`` (the config's thresholds, NMS /
soft-NMS settings and top-k), written next to the model file, makes the final detections. Soft-NMS is a
sequential algorithm with data-dependent loops that no tracer records, so it cannot be inside the graph; hard
NMS runs in the same step so that all settings and formats share one path (and thresholds can be raised
without re-exporting).

The exporter is ``torch.jit.trace`` / the TorchScript-based ``torch.onnx.export(..., dynamo=False)``:
``torch.export`` (and so the dynamo-based ONNX exporter) stops at data-dependent branches inside Detectron2
(``if not valid_mask.all()`` in ``find_top_rpn_proposals``, ``numel() == 0`` checks in FCOS decoding), which a
plugin cannot change. OpenVINO models are converted from the ONNX graph (``openvino.convert_model``).
Deformable convolutions (``torchvision::deform_conv2d``) become ONNX ``DeformConv`` (opset 19), which ONNX
Runtime runs and OpenVINO's converter does not take.
torch 2.14 marks ``torch.jit.trace`` / ``torch.jit.load`` deprecated; their warnings are silenced here, since
no supported exporter handles these models yet (the parity check guards the result).
"""
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
import warnings

import numpy as np
import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from torch import nn

from ..modeling.postprocess import PostprocessParams, replaced_postprocess
from ..utils.errors import DefectsError

__all__ = [
    "FORMATS", "MODEL_FILES", "ExportError", "export_model", "load_exported", "ExportedModel",
    "compare_detections", "check_parity", "deferred_postprocess", "load_samples", "output_files", "check_exportable",
    "ExportedDetector", "sliced_exported", "check_sliced_parity", "check_matches_config", "require_runtime",
    "convert_openvino",
]

FORMATS = ("torchscript", "onnx", "openvino")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "openvino": "model.xml"}
POSTPROCESS_FILES = ("postprocess.py", "postprocess.json")
ONNX_OPSET = 17
DCN_ONNX_OPSET = 19  # the first opset with DeformConv; used only for models with deformable convolutions
_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}


class ExportError(DefectsError, RuntimeError):
    """A model or setting that cannot be exported, a missing runtime package, or a failed parity check; the
    message is one line naming the reason (the tools report it as one ``ERROR:`` line, exit code 2)."""


def check_exportable(cfg):
    """
    Raise :class:`ExportError` naming the key for settings the exported graph cannot reproduce (checked before
    the model is built): test-time augmentation, DefectSOLO, and DefectRCNN's per-image skipping of the heads. Sliced
    inference (``TEST.SLICE``) is allowed: the graph is the per-tile model, the tiling and the merge run in Python
    (:func:`sliced_exported`).
    """
    if cfg.TEST.AUG.ENABLED:
        raise ExportError("TEST.AUG.ENABLED: test-time augmentation is not part of the exported graph; export "
                          "with TEST.AUG.ENABLED False (the parity check compares plain inference)")
    if cfg.MODEL.MASK_ON and cfg.MODEL.META_ARCHITECTURE == "DefectSOLO":
        raise ExportError("MODEL.META_ARCHITECTURE DefectSOLO: its masks come from dynamic kernels and Matrix NMS, "
                          "which the exported graph does not hold; Mask R-CNN heads (MODEL.MASK_ON) are exported")
    if cfg.MODEL.META_ARCHITECTURE == "DefectRCNN" and cfg.MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD > 0:
        raise ExportError(
            f"cannot trace DefectRCNN: MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD={cfg.MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD}"
            " skips the heads per image (data-dependent); export with 0 and apply the threshold to the exported "
            "defect_score")


def output_files(output_dir, fmt):
    """Paths that :func:`export_model` writes for ``fmt`` (OpenVINO: ``model.xml`` and its ``model.bin``)."""
    files = [MODEL_FILES[fmt]] + (["model.bin"] if fmt == "openvino" else []) + list(POSTPROCESS_FILES)
    return [os.path.join(output_dir, f) for f in files]


def deferred_postprocess(model):
    """
    Within the block, the project's postprocessing in ``model`` (every :class:`PostprocessParams` held by its
    modules: box predictors, DefectFCOS) returns all candidates above the score thresholds, without NMS and
    top-k. Yields the original params (one per holder; empty for a model with Detectron2's stock heads).
    """
    return replaced_postprocess(model, defer_nms=True)


class _FlatDetector(nn.Module):
    """
    ``model``'s inference on one image tensor without Detectron2's ``detector_postprocess`` (clip to the
    output size, drop empty boxes: ``postprocess.py`` does it after the top-k cut, as the eager model does),
    with flat tensor outputs: boxes, classes, scores, then the image-level outputs (DefectRCNN:
    ``defect_score``). The steps are those of ``GeneralizedRCNN.inference`` and ``DenseDetector.forward``
    (detectron2 a59f056), restated because their postprocessing cannot be switched off with image-level
    outputs kept.
    """

    def __init__(self, model):
        super().__init__()
        if getattr(model, "skip_normal_threshold", 0) > 0:
            # which images skip the heads depends on the data; a trace would fix the sample image's choice
            raise ExportError(
                f"cannot trace {type(model).__name__}: MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD="
                f"{model.skip_normal_threshold} skips the heads per image (data-dependent); export with 0 and "
                "apply the threshold to the exported defect_score"
            )
        if not isinstance(model, (GeneralizedRCNN, DenseDetector)):
            raise ExportError(f"cannot export {type(model).__name__}: only GeneralizedRCNN and DenseDetector "
                              "subclasses (R-CNN, DefectRCNN, DefectFCOS, RetinaNet) are supported")
        self.model = model
        self.extra_names = ["defect_score"] if hasattr(model, "image_logits") else []
        self.with_masks = bool(getattr(getattr(model, "roi_heads", None), "mask_on", False))

    def forward(self, image):
        m = self.model
        images = m.preprocess_image([{"image": image}])
        features = m.backbone(images.tensor)
        extras = ()
        if isinstance(m, GeneralizedRCNN):
            proposals, _ = m.proposal_generator(images, features, None)
            results, _ = m.roi_heads(images, features, proposals, None)
            if self.extra_names:
                extras = (m.image_logits(features).sigmoid()[0],)
        else:
            features = [features[f] for f in m.head_in_features]
            results = m.forward_inference(images, features, m.head(features))
        inst = results[0]
        masks = (inst.pred_masks[:, 0],) if self.with_masks else ()
        return (inst.pred_boxes.tensor, inst.pred_classes, inst.scores) + masks + extras


def _first_line(e):
    return next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)


def require_runtime(fmt):
    """Raise :class:`ExportError` when a package the runtime of ``fmt`` needs is not installed."""
    for pkg in _PACKAGES.get(fmt, ()):
        if importlib.util.find_spec(pkg) is None:
            raise ExportError(f"--format {fmt} needs the {pkg} package (pinned in requirements.txt; "
                              f"bash bootstrap.sh installs it)")


def _postprocess_params(params_list):
    if not params_list:
        return None  # Detectron2's stock heads: their NMS is inside the graph
    params = [dataclasses.asdict(p) for p in params_list]
    if any(p != params[0] for p in params[1:]):
        raise ExportError("the model's heads postprocess with different settings; export needs one setting")
    params[0].pop("defer_nms")
    return params[0]


def export_model(model, image, output_dir, fmt, meta=None):
    """
    Trace ``model`` (eval mode, the standard ``model(list[dict]) -> [{"instances", ...}]`` interface) on
    ``image`` and write ``fmt``'s model file, ``postprocess.py`` and ``postprocess.json`` into ``output_dir``.

    Args:
        image (Tensor): (3, H, W) uint8 model input (``INPUT.FORMAT``, resized to the test size).
        fmt (str): one of :data:`FORMATS`.
        meta (dict): extra entries for ``postprocess.json`` (e.g. the input format and test size).
    Returns:
        list[str]: the written files (model file first).
    Raises:
        ExportError: when the model cannot be traced or converted, or a runtime package is missing.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}, expected one of {FORMATS}")
    require_runtime(fmt)
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    with deferred_postprocess(model) as params_list, torch.no_grad():
        params = _postprocess_params(params_list)
        flat = _FlatDetector(model).eval()
        try:
            with warnings.catch_warnings():
                # the tracer warns about every Python-level shape check in Detectron2; the parity check counts
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(flat, (image,), check_trace=False)
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:
            raise ExportError(f"cannot trace {type(model).__name__}: {_first_line(e)}") from None
        names = ["boxes", "classes", "scores"] + (["masks"] if flat.with_masks else []) + flat.extra_names
        if fmt == "torchscript":
            traced.save(path)
        elif fmt == "onnx":
            _export_onnx(flat, image, path, names)
        else:
            if _has_deform_conv(model):
                raise ExportError("OpenVINO cannot convert deformable convolutions (ONNX DeformConv) of "
                                  "MODEL.RESNETS.DEFORM_ON_PER_STAGE; use --format onnx or torchscript")
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = os.path.join(tmp, "model.onnx")
                _export_onnx(flat, image, onnx_path, names)
                convert_openvino(onnx_path, path)
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "deploy_postprocess.py"),
                    os.path.join(output_dir, "postprocess.py"))
    from ..modeling.tta import model_num_classes

    info = dict(meta or {}, format=fmt, model_file=MODEL_FILES[fmt], outputs=names, postprocess=params,
                num_classes=model_num_classes(model))
    with open(os.path.join(output_dir, "postprocess.json"), "w") as f:
        json.dump(info, f, indent=2)
    return output_files(output_dir, fmt)


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                            groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19; same offset layout, mask optional)."""
    from torch.onnx import symbolic_helper

    def const(v, kind="i"):
        return symbolic_helper._get_const(v, kind, "deform_conv2d argument")

    inputs = [input, weight, offset, bias] + ([mask] if const(use_mask, "b") else [])
    ph, pw = const(pad_h), const(pad_w)
    return g.op("DeformConv", *inputs, strides_i=[const(stride_h), const(stride_w)], pads_i=[ph, pw, ph, pw],
                dilations_i=[const(dil_h), const(dil_w)], group_i=const(groups), offset_group_i=const(offset_groups))


@contextlib.contextmanager
def _deform_conv_onnx_export():
    """Register the DeformConv symbolic for the duration of one export (torch's registry, nothing else)."""
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_symbolic, DCN_ONNX_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("torchvision::deform_conv2d", DCN_ONNX_OPSET)


def _has_deform_conv(model):
    from ..modeling.backbone.resnet_dcn import ResNetDeformConv

    return any(isinstance(m, ResNetDeformConv) for m in model.modules())


def _export_onnx(flat, image, path, names):
    dynamic = {"image": {1: "height", 2: "width"}}
    dynamic.update({n: {0: "num_candidates"} for n in names if n in ("boxes", "classes", "scores", "masks")})
    dcn = _has_deform_conv(flat)
    try:
        with warnings.catch_warnings(), (_deform_conv_onnx_export() if dcn else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            torch.onnx.export(flat, (image,), path, opset_version=DCN_ONNX_OPSET if dcn else ONNX_OPSET, dynamo=False,
                              input_names=["image"], output_names=names, dynamic_axes=dynamic)
    except (RuntimeError, ValueError, TypeError, AssertionError, torch.onnx.errors.OnnxExporterError) as e:
        raise ExportError(f"cannot export {type(flat.model).__name__} to ONNX: {_first_line(e)}") from None


def convert_openvino(onnx_path, xml_path):
    """Convert the ONNX graph ``onnx_path`` to OpenVINO's ``xml_path`` (+ .bin), FP32 weights."""
    import openvino as ov

    try:
        ov_model = ov.convert_model(onnx_path)
    except Exception as e:  # OpenVINO raises its own exception types (OpConversionFailure, ...)
        raise ExportError(f"cannot convert the ONNX graph to OpenVINO: {_first_line(e)}") from None
    # fp32 weights: fp16 compression would break parity with the eager model
    ov.save_model(ov_model, xml_path, compress_to_fp16=False)


def load_samples(cfg, spec=None, n=3, resize=True):
    """
    Model inputs for tracing and the parity check: (3, H, W) uint8 tensors resized like at test time, from
    the image files of ``spec`` (folder or glob; unreadable files are skipped) or, without ``spec``, ``n``
    random images of three aspect ratios. With ``resize=False`` the images keep their size (the inputs of sliced
    inference); random ones are then 1.5 tiles (``TEST.SLICE.SIZE``) high, so that they are cut into several tiles.

    Raises:
        ExportError: when ``spec`` holds no readable image.
    """
    from detectron2.data.transforms import ResizeShortestEdge

    from .predictor import ImageReadError, list_images, read_image

    if spec:
        images = []
        for f in list_images(spec):
            try:
                images.append(read_image(f, cfg.INPUT.FORMAT))
            except ImageReadError:
                continue
            if len(images) == n:
                break
    else:
        rng = np.random.default_rng(0)
        s = cfg.INPUT.MIN_SIZE_TEST if resize else int(1.5 * max(cfg.TEST.SLICE.SIZE))
        images = [rng.integers(0, 256, (s, int(s * r), 3), dtype=np.uint8) for r in (4 / 3, 1.0, 1.5)[:n]]
    if not images:
        raise ExportError(f"no readable sample images in {spec}")
    if not resize:
        return [torch.as_tensor(np.ascontiguousarray(i.transpose(2, 0, 1))) for i in images]
    resize = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    return [torch.as_tensor(np.ascontiguousarray(resize.get_transform(i).apply_image(i).transpose(2, 0, 1)))
            for i in images]


# ---------------------------------------------------------------------------------------------------------
# running an export


def _load_module(path):
    spec = importlib.util.spec_from_file_location(f"_d2_defects_postprocess_{uuid.uuid4().hex}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ExportedModel:
    """
    An exported model in its runtime (TorchScript, ONNX Runtime or OpenVINO on CPU) plus the
    ``postprocess.py`` / ``postprocess.json`` shipped next to it: what a deployment runs.

    ``model(image)`` takes a (3, H, W) uint8 tensor or array (model input) and returns the eager model's
    output format: ``{"instances": Instances, <image-level outputs as floats, e.g. "defect_score">}``.
    """

    def __init__(self, output_dir, fmt, threads=None):
        if fmt not in FORMATS:
            raise ExportError(f"unknown format {fmt!r}, expected one of {FORMATS}")
        missing = [p for p in output_files(output_dir, fmt) if not os.path.isfile(p)]
        if missing:
            raise ExportError(f"{missing[0]} not found: export the model first (tools/export_model.py --format {fmt})")
        require_runtime(fmt)
        with open(os.path.join(output_dir, "postprocess.json")) as f:
            self.info = json.load(f)
        self.fmt = fmt
        self.path = os.path.join(output_dir, MODEL_FILES[fmt])
        self.postprocess = _load_module(os.path.join(output_dir, "postprocess.py"))
        self.outputs = self.info["outputs"]
        if fmt == "torchscript":
            with warnings.catch_warnings():  # deprecated in torch 2.14, see the module docstring
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                self._module = torch.jit.load(self.path)
        elif fmt == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        else:
            import openvino as ov

            config = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16 on CPUs that have it: parity
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self._compiled = ov.Core().compile_model(self.path, "CPU", config)

    def file_size(self):
        """Bytes of the model file(s) (OpenVINO: .xml + .bin)."""
        files = output_files(os.path.dirname(self.path), self.fmt)[: 2 if self.fmt == "openvino" else 1]
        return sum(os.path.getsize(f) for f in files)

    def raw(self, image):
        """The graph's outputs (numpy arrays, in the order of ``postprocess.json``'s ``outputs``)."""
        if self.fmt == "torchscript":
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return [o.numpy() for o in self._module(torch.as_tensor(image))]
        array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if self.fmt == "onnx":
            return self._session.run(None, {"image": array})
        result = self._compiled([array])
        return [result[o] for o in self._compiled.outputs]

    def __call__(self, image, output_size=None):
        """
        Args:
            image: (3, H, W) uint8 model input (resized to the test size).
            output_size (tuple): (height, width) to report boxes in (e.g. the image's before the test resize),
                scaled and clipped as Detectron2's ``detector_postprocess`` does; default (H, W).
        """
        outs = dict(zip(self.outputs, self.raw(image)))
        params = self.info["postprocess"]
        h, w = (int(v) for v in image.shape[-2:])
        size = (h, w) if output_size is None else tuple(int(v) for v in output_size)
        args = (outs["boxes"], outs["scores"], outs["classes"], params, (h, w), size)
        if "masks" in outs:
            boxes, scores, classes, index = self.postprocess.postprocess(*args, return_index=True)
        else:  # also the postprocess.py of box models exported before return_index existed
            boxes, scores, classes = self.postprocess.postprocess(*args)
        inst = Instances(size, pred_boxes=Boxes(torch.as_tensor(np.ascontiguousarray(boxes))),
                         scores=torch.as_tensor(np.ascontiguousarray(scores)),
                         pred_classes=torch.as_tensor(np.ascontiguousarray(classes)).long())
        if "masks" in outs:  # Mask R-CNN heads: the kept candidates' masks, pasted at the output size
            inst.pred_masks = torch.as_tensor(self.postprocess.paste_masks(outs["masks"][index], boxes, size))
        return dict(instances=inst, **{k: float(v) for k, v in outs.items()
                                       if k not in ("boxes", "classes", "scores", "masks")})


def load_exported(output_dir, fmt=None, threads=None):
    """:class:`ExportedModel` of ``output_dir`` (written by :func:`export_model`); ``fmt`` defaults to the format
    recorded in its ``postprocess.json``."""
    if fmt is None:
        path = os.path.join(output_dir, "postprocess.json")
        try:
            with open(path) as f:
                fmt = json.load(f)["format"]
        except FileNotFoundError:
            raise ExportError(f"{path} not found: not a folder written by tools/export_model.py") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ExportError(f"{path}: not a postprocess.json written by tools/export_model.py (no \"format\")") \
                from None
    return ExportedModel(output_dir, fmt, threads=threads)


class ExportedDetector:
    """
    An :class:`ExportedModel` behind the eager detectors' inference interface, so that the project's Python-side
    inference runs exported models: ``detector([{"image": (3, h, w) uint8 at the test size, "height": H, "width":
    W}, ...])`` returns ``[{"instances": boxes in H x W px, <image-level outputs>}, ...]`` as Detectron2's models
    do. :class:`~d2_defects.modeling.slicing.SlicedDetector` and :class:`~d2_defects.inference.BatchPredictor`
    take it in place of the eager model (``tools/predict.py --exported``).
    """

    training = False

    def __init__(self, exported):
        self.exported = exported
        self.num_classes = exported.info.get("num_classes")  # K, for per-class score thresholds of the merge

    def eval(self):
        return self

    @contextlib.contextmanager
    def replaced_postprocess(self, **changes):
        """Within the block, ``postprocess.py`` runs with ``changes`` to the exported settings (e.g.
        ``fragment_decay=False`` for the tiles of sliced inference); see
        :func:`d2_defects.modeling.postprocess.replaced_postprocess`."""
        info = self.exported.info
        original = info.get("postprocess")
        if original is not None:
            info["postprocess"] = dict(original, **changes)
        try:
            yield [] if original is None else [original]
        finally:
            if original is not None:
                info["postprocess"] = original

    def __call__(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            h, w = (int(v) for v in x["image"].shape[-2:])
            outs.append(self.exported(x["image"], output_size=(int(x.get("height", h)), int(x.get("width", w)))))
        return outs


def check_matches_config(cfg, exported, folder):
    """
    Raise :class:`ExportError` listing every setting in which ``cfg`` differs from what ``exported`` was exported
    with (``postprocess.json``): ``INPUT.FORMAT``, the test size, the postprocessing thresholds (the graph applies the
    exported score thresholds, a merge would apply the config's) and, with ``TEST.SLICE.ENABLED``, the recorded slice
    settings when there are some. Running an export with another config silently changes the results otherwise.
    """
    from ..modeling.postprocess import PostprocessParams
    from ..modeling.slicing import slice_options

    info = exported.info
    wrong = []
    for key, name, value in [("INPUT.FORMAT", "input_format", cfg.INPUT.FORMAT),
                             ("INPUT.MIN_SIZE_TEST", "min_size_test", cfg.INPUT.MIN_SIZE_TEST),
                             ("INPUT.MAX_SIZE_TEST", "max_size_test", cfg.INPUT.MAX_SIZE_TEST)]:
        if name in info and info[name] != value:
            wrong.append(f"{key} {value} (exported with {info[name]})")
    if info.get("postprocess") is not None:
        params = dataclasses.asdict(PostprocessParams.from_config(cfg, num_classes=info.get("num_classes")))
        params.pop("defer_nms")
        default = dataclasses.asdict(PostprocessParams())  # keys added since an export was made: their default
        diff = sorted(k for k, v in params.items() if info["postprocess"].get(k, default.get(k)) != v)
        if diff:
            wrong.append(f"postprocessing {', '.join(diff)} (MODEL.ROI_HEADS.* / MODEL.SOFT_NMS.* / "
                         "MODEL.FRAGMENT_DECAY.* / TEST.DETECTIONS_PER_IMAGE)")
    if cfg.TEST.SLICE.ENABLED and info.get("slice"):
        mine = json.loads(json.dumps(slice_options(cfg)))  # tuples as lists, as in the json
        diff = sorted(k for k, v in mine.items() if info["slice"].get(k) != v and k != "batch")
        if diff:
            wrong.append(f"TEST.SLICE {', '.join(diff)}")
    if wrong:
        raise ExportError(f"{folder} was exported with other settings than this config: {'; '.join(wrong)}; use the "
                          "config it was exported with (postprocess.json names it)")


def sliced_exported(cfg, exported):
    """
    Sliced inference (``TEST.SLICE.*`` of ``cfg``) with an exported model: the same tiles, per-tile resize and single
    merge as the eager model's (:class:`~d2_defects.modeling.slicing.SlicedDetector`), each tile run in the runtime
    and through ``postprocess.py``. Returns a module with the detector's inference interface (inputs at the
    image's original resolution). The runtime takes one tile per call (``TEST.SLICE.BATCH`` has no effect), which is
    the eager model at ``BATCH`` 1: in an eager batch, tiles of other sizes are zero-padded to a common size, which
    changes the features near a smaller tile's border.
    """
    from ..modeling.slicing import SlicedDetector

    return SlicedDetector(_one_tile_per_pass(cfg), ExportedDetector(exported)).eval()


def _one_tile_per_pass(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.SLICE.BATCH = 1
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------------------------------------
# parity


def compare_detections(a, b, atol=1e-3, score_atol=1e-4):
    """
    Match two detection sets of one image: each detection of ``a`` pairs with an unused one of ``b`` of the
    same class whose boxes differ by at most ``atol`` px (every coordinate) and scores by at most
    ``score_atol`` (order-free: exported runtimes may order equal scores differently).

    Returns:
        dict: ``ok`` (same number, all matched), ``num`` (len(a), len(b)), ``unmatched`` (count),
        ``max_box_diff`` (px), ``max_score_diff`` (over matched pairs; inf when none matched but some exist),
        ``pairs`` (the matched (index in a, index in b)).
    """
    na, nb = len(a), len(b)
    out = dict(ok=na == nb, num=(na, nb), unmatched=0, max_box_diff=0.0, max_score_diff=0.0, pairs=[])
    if na == 0 or nb == 0:
        out["unmatched"] = max(na, nb)
        if na or nb:
            out.update(ok=False, max_box_diff=float("inf"), max_score_diff=float("inf"))
        return out
    ba, bb = a.pred_boxes.tensor.double().numpy(), b.pred_boxes.tensor.double().numpy()
    sa, sb = a.scores.double().numpy(), b.scores.double().numpy()
    box = np.abs(ba[:, None, :] - bb[None, :, :]).max(axis=2)  # (na, nb)
    score = np.abs(sa[:, None] - sb[None, :])
    cost = np.where(a.pred_classes.numpy()[:, None] == b.pred_classes.numpy()[None, :],
                    box / max(atol, 1e-12) + score / max(score_atol, 1e-12), np.inf)
    used = np.zeros(nb, dtype=bool)
    worst_box = worst_score = 0.0
    for i in np.argsort(-sa, kind="stable"):
        c = np.where(used, np.inf, cost[i])
        j = int(np.argmin(c))
        if not np.isfinite(c[j]) or box[i, j] > atol or score[i, j] > score_atol:
            out["unmatched"] += 1
            continue
        used[j] = True
        out["pairs"].append((int(i), j))
        worst_box, worst_score = max(worst_box, box[i, j]), max(worst_score, score[i, j])
    out.update(ok=out["ok"] and out["unmatched"] == 0, max_box_diff=float(worst_box),
               max_score_diff=float(worst_score))
    return out


def check_parity(model, exported, images, atol=1e-3, score_atol=1e-4, mask_atol=0.01):
    """
    Run the eager ``model`` and ``exported`` (an :class:`ExportedModel` or any callable with its output
    format) on ``images`` ((3, H, W) uint8 tensors) and compare detections, masks and image-level outputs.

    Returns:
        dict: ``max_box_diff``, ``max_score_diff`` over all images (image-level outputs count as scores),
        ``max_mask_diff`` (mask models: the largest share of a matched pair's mask pixels, eager or exported, that
        differ; 0 otherwise), ``num_detections`` (eager, per image).
    Raises:
        ExportError: naming the first image that differs beyond ``atol`` px / ``score_atol`` / ``mask_atol``.
    """
    worst = dict(max_box_diff=0.0, max_score_diff=0.0, max_mask_diff=0.0, num_detections=[])
    model.eval()
    for i, image in enumerate(images):
        with torch.no_grad():
            eager = model([{"image": image}])[0]
        got = exported(image)
        diff = compare_detections(eager["instances"], got["instances"], atol, score_atol)
        extra = {k: abs(float(eager[k]) - got.get(k, float("inf"))) for k in eager if k != "instances"}
        mask_diff = _mask_diff(eager["instances"], got["instances"], diff["pairs"])
        if not diff["ok"] or any(not v <= score_atol for v in extra.values()) or not mask_diff <= mask_atol:
            detail = ", ".join(f"{k} differs by {v:.2e}" for k, v in extra.items() if not v <= score_atol)
            if not mask_diff <= mask_atol:
                detail = ", ".join(x for x in (detail, f"a mask differs in {100 * mask_diff:.2f}% of its pixels "
                                                       f"(allowed {100 * mask_atol:.2f}%)") if x)
            if not diff["ok"]:
                detail = (f"{diff['num'][0]} eager vs {diff['num'][1]} exported detections, {diff['unmatched']} "
                          f"without a match within {atol} px / score {score_atol}" + (f"; {detail}" if detail else ""))
            raise ExportError(f"exported model differs from the eager model on sample {i} "
                              f"(shape {tuple(image.shape)}): {detail}")
        worst["max_box_diff"] = max(worst["max_box_diff"], diff["max_box_diff"])
        worst["max_score_diff"] = max(worst["max_score_diff"], diff["max_score_diff"], *extra.values())
        worst["max_mask_diff"] = max(worst["max_mask_diff"], mask_diff)
        worst["num_detections"].append(len(eager["instances"]))
    return worst


def _mask_diff(a, b, pairs):
    """The largest share of differing pixels among the matched pairs' masks (over the pixels in either mask);
    inf when only one side has masks."""
    if not a.has("pred_masks") and not b.has("pred_masks"):
        return 0.0
    if not (a.has("pred_masks") and b.has("pred_masks")):
        return float("inf")
    worst = 0.0
    for i, j in pairs:
        ma, mb = a.pred_masks[i].bool(), b.pred_masks[j].bool()
        worst = max(worst, float((ma ^ mb).sum()) / max(1.0, float((ma | mb).sum())))
    return worst


def check_sliced_parity(cfg, model, exported, images, atol=1e-3, score_atol=1e-4):
    """
    :func:`check_parity` of sliced inference (``TEST.SLICE.*`` of ``cfg``): the eager model's
    :class:`~d2_defects.modeling.slicing.SlicedDetector` at ``BATCH`` 1 (see :func:`sliced_exported`) against
    :func:`sliced_exported` on ``images`` ((3, H, W) uint8 tensors at their original resolution). Same return value
    and error.
    """
    from ..modeling.slicing import SlicedDetector

    sliced = sliced_exported(cfg, exported)
    return check_parity(SlicedDetector(_one_tile_per_pass(cfg), model).eval(), lambda image: sliced([{"image": image}])[0], images,
                        atol, score_atol)
