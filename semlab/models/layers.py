"""Building blocks of the DINOv2 Vision Transformer.

Parameter names follow the released DINOv2 checkpoints (``patch_embed.proj``, ``attn.qkv``,
``attn.proj``, ``ls1.gamma``, ``mlp.fc1``/``mlp.fc2`` or ``mlp.w12``/``mlp.w3``), so a state
dict of the reference loads without renaming.

Every block accepts either one tensor or a list of tensors (crop batches of different token
counts). A list is processed element by element inside a single ``forward`` call, so that
wrappers hooking ``forward`` (FSDP2 ``fully_shard``, activation checkpointing) fire once per
block rather than once per crop batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semlab.models.attention import PackedLayout, attend, attend_packed, check_kernel

TensorOrList = Tensor | list[Tensor]


def _map(fn: Callable[[Tensor], Tensor], x: TensorOrList) -> TensorOrList:
    return [fn(t) for t in x] if isinstance(x, list) else fn(x)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) by a stride-p convolution ``proj``."""

    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size[0]
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}; crop or resize the input "
                f"to a multiple of {p}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(softmax(q k^T / sqrt(d_h)) v)`` with fused ``qkv``.

    ``kernel`` is ``sdpa`` | ``flex`` | ``xformers`` (:mod:`semlab.models.attention`); all compute the
    same function. With a :class:`PackedLayout` the input is a packed (1, T, D) sequence of several
    crop batches and attention stays inside each crop (block-diagonal).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel: str = "sdpa",
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.kernel = check_kernel(kernel)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, x: Tensor, layout: PackedLayout | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d_h)
        dropout_p = self.attn_drop if self.training else 0.0
        if layout is None:
            out = attend(q, k, v, self.kernel, dropout_p)
        else:
            out = attend_packed(q, k, v, layout, dropout_p)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))

    def forward(self, x: TensorOrList, layout: PackedLayout | None = None) -> TensorOrList:
        if layout is not None:
            return self._attend(x, layout)  # type: ignore[arg-type]
        return _map(self._attend, x)


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` followed by dropout (GELU by default)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_dim(hidden_features: int) -> int:
    """Hidden width of the fused SwiGLU: ``2/3`` of the MLP width rounded up to a multiple of 8.

    ViT-g: mlp_ratio 4 * 1536 = 6144 -> 4096, hence ``w12`` [8192, 1536] and ``w3`` [1536, 4096].
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(x1) * x2)`` with ``[x1, x2] = chunk(w12(x), 2)``.

    ``hidden_features`` is used as given; ``SwiGLUFFNFused`` applies the 2/3 rule first.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU with the hidden width of the released ViT-g (see :func:`swiglu_hidden_dim`)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ):
        out_features = out_features or in_features
        hidden_features = swiglu_hidden_dim(hidden_features or in_features)
        super().__init__(in_features, hidden_features, out_features, bias=bias)


class LayerScale(nn.Module):
    """Per-channel scaling ``x * gamma`` with ``gamma`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample: zero a sample's residual with probability p, scale the rest by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_add_residual_stochastic_depth(
    x: Tensor, residual_func: Callable[[Tensor], Tensor], sample_drop_ratio: float
) -> Tensor:
    """Stochastic depth that skips the computation for the dropped samples (DINOv2's batch-subset form).

    A random subset of ``max(int(B * (1 - p)), 1)`` samples gets ``residual_func``, scaled by
    ``B / subset``; the other samples pass through unchanged. Used by :class:`Block` in training when
    the drop rate exceeds 0.1, where the saved compute outweighs the gather/scatter.
    """
    keep = sample_subset(x.shape[0], sample_drop_ratio, x.device)
    return _add_subset_residual(x, keep, residual_func(x[keep]))


def subset_size(b: int, sample_drop_ratio: float) -> int:
    """How many of ``b`` samples get the residual in the batch-subset stochastic depth."""
    return max(int(b * (1.0 - sample_drop_ratio)), 1)


def sample_subset(b: int, sample_drop_ratio: float, device: torch.device) -> Tensor:
    """The random samples (indices) that get the residual: the first ``subset_size`` of a permutation."""
    return torch.randperm(b, device=device)[: subset_size(b, sample_drop_ratio)]


def _add_subset_residual(x: Tensor, keep: Tensor, residual: Tensor) -> Tensor:
    """``x[keep] += residual * B / |keep|``, out of place."""
    b = x.shape[0]
    out = torch.index_add(
        x.flatten(1), 0, keep, residual.to(dtype=x.dtype).flatten(1), alpha=b / keep.shape[0]
    )
    return out.view_as(x)


def segments_of(xs: list[Tensor]) -> tuple[tuple[int, int], ...]:
    """(batch, tokens) of each crop batch: the key of its :class:`PackedLayout`."""
    return tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)


FFN_LAYERS = ("mlp", "swiglufused", "swiglu", "identity")


def make_ffn(
    ffn_layer: str, dim: int, hidden: int, act_layer: Callable[..., nn.Module], drop: float, bias: bool
) -> nn.Module:
    """The block's feed-forward by name: ``mlp`` (fc1/fc2), ``swiglufused``/``swiglu`` (w12/w3, 2/3 width
    rule as the reference maps both names to the fused layer) or ``identity``."""
    if ffn_layer == "mlp":
        return Mlp(dim, hidden, act_layer=act_layer, drop=drop, bias=bias)
    if ffn_layer in ("swiglufused", "swiglu"):
        return SwiGLUFFNFused(dim, hidden, bias=bias)
    if ffn_layer == "identity":
        return nn.Identity()
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth.

    ``x = x + drop_path(ls1(attn(norm1(x))))``; ``x = x + drop_path(ls2(mlp(norm2(x))))``.
    In training with a drop rate above 0.1 the batch-subset form
    (:func:`drop_add_residual_stochastic_depth`) is used instead, as in the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        ffn_layer: str = "mlp",
        attention: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            kernel=attention,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio), act_layer, drop, ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = float(drop_path)

    def _attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, self._attn_residual, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self._ffn_residual, self.sample_drop_ratio)
        if self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(self._attn_residual(x))
            return x + self.drop_path2(self._ffn_residual(x))
        x = x + self._attn_residual(x)
        return x + self._ffn_residual(x)

    def forward(self, x: TensorOrList, layouts: dict[Any, PackedLayout] | None = None) -> TensorOrList:
        """One tensor, a list of crop batches one by one, or (``layouts`` given) a list of crop
        batches packed into one sequence (:meth:`_forward_packed`)."""
        if layouts is not None and isinstance(x, list):
            return self._forward_packed(x, layouts)
        return _map(self._forward, x)

    def packed_segments(self, segments: tuple[tuple[int, int], ...]) -> set[tuple[tuple[int, int], ...]]:
        """The packed layouts this block needs for crop batches ``segments`` in training: the full one,
        and with the batch-subset stochastic depth the one of the sample subsets."""
        needed = {segments}
        if self.sample_drop_ratio > 0.1:
            needed.add(tuple((subset_size(b, self.sample_drop_ratio), n) for b, n in segments))
        return needed

    def _forward_packed(self, xs: list[Tensor], layouts: dict[Any, PackedLayout]) -> list[Tensor]:
        """The block on packed crop batches: every linear layer runs once on the (1, T, D) sequence,
        attention stays block diagonal; stochastic depth acts per crop as in :meth:`_forward`."""

        def attn_res(x: Tensor, layout: PackedLayout) -> Tensor:
            return self.ls1(self.attn(self.norm1(x), layout))

        def ffn_res(x: Tensor, layout: PackedLayout) -> Tensor:
            return self.ls2(self.mlp(self.norm2(x)))

        if self.training and self.sample_drop_ratio > 0.1:
            for residual in (attn_res, ffn_res):
                keeps = [sample_subset(x.shape[0], self.sample_drop_ratio, x.device) for x in xs]
                subsets = [x[k] for x, k in zip(xs, keeps)]
                layout = layouts[segments_of(subsets)]
                outs = layout.unpack(residual(layout.pack(subsets), layout))
                xs = [_add_subset_residual(x, k, r) for x, k, r in zip(xs, keeps, outs)]
            return xs
        layout = layouts[segments_of(xs)]
        if self.training and self.sample_drop_ratio > 0.0:
            for residual, drop in ((attn_res, self.drop_path1), (ffn_res, self.drop_path2)):
                outs = layout.unpack(residual(layout.pack(xs), layout))
                xs = [x + drop(r) for x, r in zip(xs, outs)]
            return xs
        x = layout.pack(xs)
        x = x + attn_res(x, layout)
        x = x + ffn_res(x, layout)
        return layout.unpack(x)


class BlockChunk(nn.ModuleList):
    """A run of consecutive blocks applied in order (the unit FSDP wraps when ``block_chunks`` > 0).

    The reference pads each chunk with leading ``nn.Identity`` modules so that a block keeps its
    global index inside its chunk: chunk 1 of a 24-block model with 4 chunks holds Identity at
    0..5 and blocks 6..11, giving state-dict keys ``blocks.1.6.`` ... ``blocks.1.11.``.
    """

    def forward(self, x: TensorOrList, layouts: dict[Any, PackedLayout] | None = None) -> TensorOrList:
        for block in self:
            x = block(x) if isinstance(block, nn.Identity) else block(x, layouts=layouts)
        return x

    def real_blocks(self) -> list[nn.Module]:
        """The blocks of this chunk without the Identity padding."""
        return [b for b in self if not isinstance(b, nn.Identity)]
