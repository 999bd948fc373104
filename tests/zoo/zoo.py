"""The torchvision zoo as test material: every classification model, random init, eval mode."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from tests.helpers import random_removal  # noqa: F401  (re-exported for the zoo tests)

ZOO = torchvision.models.list_models(module=torchvision.models)

# smallest input each family accepts (fixed-size position embeddings, window partitions)
_SIZE = {"vit": 224, "maxvit": 224, "inception": 96, "swin": 64}
# with small_vit: ViTs built for a smaller image (the same layers, a quarter of the tokens;
# vit_h_14's zoo test 73 -> 47 s on 2 cores); patch-32 models keep 224 (112 is not a multiple of 32)
_VIT_SMALL = 112


def input_size(name: str) -> int:
    for prefix, s in _SIZE.items():
        if name.startswith(prefix):
            return s
    return 64


def head_of(model: torch.nn.Module) -> str:
    """Path of the classifier's last Linear/Conv (the 'head' left whole by prune)."""
    last = None
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            last = n
    return last


def build(name: str, seed: int = 0, small_vit: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    s = input_size(name)
    kwargs = {}
    if small_vit and name.startswith("vit_") and _VIT_SMALL % int(name.rsplit("_", 1)[1]) == 0:
        s = kwargs["image_size"] = _VIT_SMALL
    model = torchvision.models.get_model(name, **kwargs).eval()
    _randomise_norms(model, seed)
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed))
    return model, x


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affines, so that wrong slicing cannot hide."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):  # 1e-6 at init would hide the blocks
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() > 1 and not p.any():  # zero-initialised heads hide everything
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _attributes_agree(model: nn.Module) -> list[str]:
    """Modules whose size attributes disagree with their (sliced) parameters."""
    bad = []
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            ok = m.out_channels == m.weight.shape[0] and m.in_channels == m.weight.shape[1] * m.groups
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            t = m.weight if m.weight is not None else m.running_mean
            ok = t is None or m.num_features == t.shape[0]
        elif isinstance(m, nn.GroupNorm):
            ok = m.weight is None or (m.num_channels == m.weight.shape[0] and m.num_channels % m.num_groups == 0)
        elif isinstance(m, nn.LayerNorm):
            ok = m.weight is None or tuple(m.normalized_shape) == tuple(m.weight.shape)
        elif isinstance(m, nn.Linear):
            ok = (m.out_features, m.in_features) == tuple(m.weight.shape)
        else:
            continue
        if not ok:
            bad.append(f"{path} ({type(m).__name__})")
    return bad
