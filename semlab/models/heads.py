"""DINO projection head (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021; DINOv2, Oquab et al., 2023).

    h = mlp(x)                      Linear-GELU-Linear-GELU-Linear (nlayers=3) to ``bottleneck_dim``
    h = h / max(||h||_2, eps)       eps = 1e-6 for float16 inputs, 1e-12 otherwise
    y = W h,  W_k = g_k v_k / ||v_k||_2   weight-normalised prototypes, no bias

The weight normalisation is written with two plain parameters, ``last_layer.weight_g`` (out, 1)
and ``last_layer.weight_v`` (out, bottleneck), instead of ``torch.nn.utils.weight_norm`` hooks,
so that FSDP2 can shard them like any other parameter; the key names match the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` per output row (``dim=0`` weight norm).

    ``weight_g`` is initialised to 1 (as the reference does after wrapping), ``weight_v`` like a
    default ``nn.Linear`` weight (Kaiming-uniform, a = sqrt(5)).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in): each row of ``weight_v`` scaled to norm ``weight_g``."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool) -> nn.Module:
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototypes (``out_dim`` of them).

    Keys: ``mlp.{0,2,4}.{weight,bias}``, ``last_layer.weight_g``, ``last_layer.weight_v``.
    MLP Linears are trunc_normal(0.02) with zero bias.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, mlp_bias)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
