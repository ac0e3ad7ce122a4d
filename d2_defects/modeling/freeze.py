"""Freezing schemes (``MODEL.FREEZE.SCHEME`` / ``MODEL.FREEZE.PATTERNS``).

Frozen parameters get ``requires_grad=False``: they receive no gradient, and Detectron2's optimizer builder
skips them, so they have no optimizer state and weight decay/momentum never touch them. BatchNorm layers whose
parameters are all frozen become ``FrozenBatchNorm2d`` so that their running statistics stay fixed too.
"""
import re

from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..utils.errors import ConfigError
from ..utils.modules import unwrap_model

__all__ = ["FREEZE_SCHEMES", "HEAD_MODULES", "freeze_model", "frozen_parameter_names"]

FREEZE_SCHEMES = ("none", "backbone", "backbone+fpn", "all_but_heads")
# top-level modules that "all_but_heads" keeps trainable: R-CNN box heads, dense detector heads, image head
HEAD_MODULES = ("roi_heads", "head", "image_head")




def frozen_parameter_names(model, scheme="none", patterns=()):
    """
    Names of the parameters that ``scheme`` and ``patterns`` freeze.

    - ``backbone``: the bottom-up network (``backbone.bottom_up.*`` under an FPN, else ``backbone.*``);
    - ``backbone+fpn``: all of ``backbone.*``;
    - ``all_but_heads``: everything except the modules in :data:`HEAD_MODULES` (the RPN is frozen too);
    - ``patterns``: regexes, ``re.search`` on the parameter name.
    """
    if scheme not in FREEZE_SCHEMES:
        raise ConfigError(f"MODEL.FREEZE.SCHEME must be one of {FREEZE_SCHEMES}, got {scheme!r}")
    model = unwrap_model(model)
    names = [n for n, _ in model.named_parameters()]
    if scheme == "backbone":
        prefix = "backbone.bottom_up." if hasattr(getattr(model, "backbone", None), "bottom_up") else "backbone."
        frozen = {n for n in names if n.startswith(prefix)}
    elif scheme == "backbone+fpn":
        frozen = {n for n in names if n.startswith("backbone.")}
    elif scheme == "all_but_heads":
        frozen = {n for n in names if n.split(".", 1)[0] not in HEAD_MODULES}
    else:
        frozen = set()
    if scheme != "none" and not frozen:
        raise ConfigError(f"MODEL.FREEZE.SCHEME={scheme!r} matches no parameter of {type(model).__name__}")
    for p in patterns:
        try:
            regex = re.compile(p)
        except re.error as e:
            raise ConfigError(f"MODEL.FREEZE.PATTERNS: invalid regex {p!r}: {e}") from e
        matched = {n for n in names if regex.search(n)}
        if not matched:
            raise ConfigError(f"MODEL.FREEZE.PATTERNS: {p!r} matches no parameter name")
        frozen |= matched
    return [n for n in names if n in frozen]


def _freeze_batchnorms(module):
    """Replace (in place) BatchNorm children whose parameters are all frozen by FrozenBatchNorm2d."""
    for name, child in module.named_children():
        params = list(child.parameters(recurse=False))
        if (
            isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm))
            and params
            and not any(p.requires_grad for p in params)
        ):
            setattr(module, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))
        else:
            _freeze_batchnorms(child)


def freeze_model(model, scheme="none", patterns=()):
    """
    Freeze (in place) what :func:`frozen_parameter_names` selects.

    Returns:
        (int, int, str): trainable and total number of parameters, and a one-line summary to log.
    """
    model_ = unwrap_model(model)
    frozen = set(frozen_parameter_names(model_, scheme, patterns))
    for n, p in model_.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    if frozen:
        _freeze_batchnorms(model_)
    total = sum(p.numel() for p in model_.parameters())
    trainable = sum(p.numel() for p in model_.parameters() if p.requires_grad)
    summary = (
        f"Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.1f}%), "
        f"MODEL.FREEZE.SCHEME={scheme!r}, {len(patterns)} pattern(s), {len(frozen)} tensors frozen"
    )
    return trainable, total, summary
