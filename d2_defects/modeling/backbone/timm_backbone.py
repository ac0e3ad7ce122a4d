"""Any timm model with ``features_only=True`` as a Detectron2 backbone, alone or under an FPN.

Weights never come from the network: ``MODEL.TIMM.PRETRAINED_WEIGHTS`` is a local file (a state dict of the
timm classification model, ``.pth`` or ``.safetensors``) or empty for random init. The outputs are named
``res<log2(stride)>`` (``res2`` = stride 4, ..., ``res5`` = stride 32) so that the usual
``MODEL.FPN.IN_FEATURES`` apply to every model.
"""
import math
import os

import timm
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from ...utils.errors import InputNotFoundError, ConfigError

__all__ = ["TimmBackbone", "build_timm_backbone", "build_timm_fpn_backbone", "build_retinanet_timm_fpn_backbone"]


class TimmBackbone(Backbone):
    """
    Wrap ``timm.create_model(name, features_only=True, out_indices=...)``.

    Args:
        name (str): timm model name.
        out_indices (list[int]): timm feature indices to output.
        pretrained_weights (str): local weight file of the timm model, or "" (random init).
        in_chans (int): input channels.
    """

    def __init__(self, name, out_indices, pretrained_weights="", in_chans=3):
        super().__init__()
        kwargs = dict(features_only=True, out_indices=tuple(out_indices), in_chans=in_chans)
        if pretrained_weights:
            if not os.path.isfile(pretrained_weights):
                raise InputNotFoundError(f"MODEL.TIMM.PRETRAINED_WEIGHTS: file not found: {pretrained_weights}")
            # timm's own loader (key remapping, classifier removal) reading the local file only
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(pretrained_weights)))
        else:
            kwargs["pretrained"] = False
        if not timm.is_model(name):
            raise ConfigError(f"MODEL.TIMM.NAME: unknown timm model {name!r}")
        try:
            self.model = timm.create_model(name, **kwargs)
        except IndexError as e:
            raise ConfigError(f"MODEL.TIMM.OUT_INDICES={list(out_indices)} not valid for {name}: {e}") from e
        info = self.model.feature_info
        self._out_features = [f"res{int(round(math.log2(r)))}" for r in info.reduction()]
        if len(set(self._out_features)) != len(self._out_features):
            raise ConfigError(
                f"MODEL.TIMM.OUT_INDICES={list(out_indices)}: {name} gives several features with the same stride "
                f"{info.reduction()}"
            )
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))

    def forward(self, x):
        """x: (N, C, H, W) -> dict name -> (N, C_i, H / stride_i, W / stride_i)."""
        return dict(zip(self._out_features, self.model(x)))

    def output_shape(self):
        return {
            k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
            for k in self._out_features
        }

    @property
    def size_divisibility(self):
        return max(self._out_feature_strides.values())


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec):
    return TimmBackbone(
        cfg.MODEL.TIMM.NAME, cfg.MODEL.TIMM.OUT_INDICES, cfg.MODEL.TIMM.PRETRAINED_WEIGHTS, input_shape.channels
    )


def _check_in_features(cfg, bottom_up):
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES: {missing} not produced by timm model {cfg.MODEL.TIMM.NAME} with "
            f"MODEL.TIMM.OUT_INDICES={list(cfg.MODEL.TIMM.OUT_INDICES)} (it gives {bottom_up._out_features})"
        )


def _fpn(cfg, bottom_up, top_block):
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec):
    """timm features + FPN with a max-pooled extra level (P2-P6 for the R-CNN configs)."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    _check_in_features(cfg, bottom_up)
    return _fpn(cfg, bottom_up, LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec):
    """timm features + FPN with P6/P7 from the last FPN input (P3-P7 for FCOS)."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    _check_in_features(cfg, bottom_up)
    last = cfg.MODEL.FPN.IN_FEATURES[-1]
    top = LastLevelP6P7(bottom_up.output_shape()[last].channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature=last)
    return _fpn(cfg, bottom_up, top)
