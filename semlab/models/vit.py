"""The DINOv2 Vision Transformer, optionally with the SEM bottleneck after the last block.

Tokens: ``[CLS, R registers, N patches]``. The learned position embedding covers CLS and the patch
grid of ``img_size`` (registers have none) and is resampled bicubically to other grids
(:func:`interpolate_patch_pos_embed`). Keyword names follow the reference ``DinoVisionTransformer``
so that its configs map one to one. This file knows nothing of FSDP, compile or checkpoints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semlab.config.checks import check_sem
from semlab.models.attention import PackedLayout, check_kernel, make_layout
from semlab.models.layers import FFN_LAYERS, Block, BlockChunk, PatchEmbed, segments_of
from semlab.models.sem import SEMMixin

TensorOrList = Tensor | list[Tensor]


def interpolate_patch_pos_embed(
    patch_pos_embed: Tensor,
    grid_hw: tuple[int, int],
    antialias: bool = False,
    offset: float = 0.1,
) -> Tensor:
    """Resample a square patch position embedding (1, M*M, D) to the grid (h0, w0): (1, h0*w0, D).

    Bicubic interpolation of the (1, D, M, M) map in float32, as the reference does: with a
    non-zero ``offset`` the call is ``interpolate(scale_factor=((h0 + offset) / M, (w0 + offset) / M))``
    (the offset avoids floating-point rounding of the output size), with ``offset == 0`` it is
    ``interpolate(size=(h0, w0))``; ``antialias`` is passed through. The result is float32.
    """
    n, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    h0, w0 = grid_hw
    grid = patch_pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs: dict[str, Any] = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)}
    else:
        kwargs = {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(grid.shape[-2:]) != (h0, w0):
        raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)


@functools.lru_cache(maxsize=16)
def _cached_layout(segments: tuple[tuple[int, int], ...], kernel: str, device: torch.device) -> PackedLayout:
    """Layouts depend only on the crop batch shapes, which stay the same from step to step."""
    return make_layout(segments, kernel, device)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(SEMMixin, nn.Module):
    """DINOv2 ViT: patch embed -> [CLS, registers, patches] + pos-embed -> blocks -> LayerNorm.

    With ``L`` > 0 (and ``V``), the SEM bottleneck (see :mod:`semlab.models.sem`) replaces the CLS
    output: ``x_norm_clstoken = norm(sem_out(simplex(x_prenorm[:, :1+R])))``; the register and patch
    outputs stay ``norm(x_prenorm)``.

    ``block_chunks`` = 0 lays the blocks out as ``blocks.<i>``; ``block_chunks`` = k > 0 groups them
    into chunks of ``depth // k`` (``blocks.<chunk>.<i>``, global i, Identity-padded) as the
    reference does for FSDP. ``drop_path_uniform`` gives every block ``drop_path_rate``, otherwise the
    rate grows linearly from 0 to ``drop_path_rate``. ``init_values`` (LayerScale) of None/0 disables
    LayerScale. ``ffn_layer`` is one of ``"mlp" | "swiglufused" | "swiglu" | "identity"``.
    ``attention`` is the attention kernel (``sdpa`` | ``flex`` | ``xformers``) and ``pack_crops`` runs a
    list of crop batches as one packed sequence with block-diagonal attention
    (:mod:`semlab.models.attention`); neither changes the function computed.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        L: int | None = None,
        V: int | None = None,
        temp: float = 1.0,
        sem_variant: str = "full",
        sem_view_dim: int | None = None,
        sem_norm: str = "layer",
        attention: str = "sdpa",
        pack_crops: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")
        if block_chunks < 0:
            raise ValueError(f"block_chunks must be >= 0, got {block_chunks}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.attention = check_kernel(attention)
        self.pack_crops = bool(pack_crops)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            dpr = [float(drop_path_rate)] * depth
        else:
            dpr = [float(drop_path_rate) * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        blocks = [
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=nn.GELU,
                ffn_layer=ffn_layer,
                init_values=init_values,
                attention=attention,
            )
            for i in range(depth)
        ]
        if block_chunks > 0:
            self.chunked_blocks = True
            chunksize = depth // block_chunks
            if chunksize < 1:
                raise ValueError(f"block_chunks {block_chunks} exceeds depth {depth}")
            chunks = [
                BlockChunk([nn.Identity()] * i + blocks[i : i + chunksize])
                for i in range(0, depth, chunksize)
            ]
            self.blocks = nn.ModuleList(chunks)
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        # The reference builds the SEM layers after the ViT's weight init, so they keep PyTorch's
        # default init (nn.Linear: U(+-1/sqrt(fan_in)); LayerNorm: ones/zeros): same order here.
        self.init_weights()
        self.sem_L = int(L or 0)
        if self.sem_L > 0:
            check_sem(L, V)
            self._init_sem(
                (1 + num_register_tokens) * embed_dim,
                embed_dim,
                int(L),
                int(V),
                temp,
                sem_variant,
                sem_view_dim,
                sem_norm,
            )

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """pos_embed ~ trunc_normal(0.02); cls and register tokens ~ N(0, 1e-6); mask_token = 0;
        every Linear of the ViT ~ trunc_normal(0.02) with zero bias (LayerNorm and the patch conv keep
        torch's init). The SEM layers (``sem_*``) are left alone: as in the reference, they keep
        PyTorch's default init, whose scale sets how fast SEM trains from released weights."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for name, module in self.named_modules():
            if not name.startswith("sem_"):
                _init_linear(module)

    # ---------------------------------------------------------------- tokens
    def iter_blocks(self) -> Iterator[Block]:
        """The transformer blocks in order, whatever the chunk layout."""
        for module in self.blocks:
            if isinstance(module, BlockChunk):
                yield from module.real_blocks()  # type: ignore[misc]
            else:
                yield module  # type: ignore[misc]

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding (1, 1+N, D) for tokens ``x`` (B, 1+N, D) of an image h x w, in x's dtype.

        The stored embedding is returned as is when the grid is the stored square one; otherwise
        its patch part is resampled by :func:`interpolate_patch_pos_embed` (float32), CLS kept.
        """
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        patch = interpolate_patch_pos_embed(
            pos_embed[:, 1:],
            (h // self.patch_size, w // self.patch_size),
            antialias=self.interpolate_antialias,
            offset=self.interpolate_offset,
        )
        return torch.cat((pos_embed[:, :1], patch), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1+R+N, D).

        Patches where ``masks`` (B, N) is True are replaced by ``mask_token`` before the pos-embed is added.
        """
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks of shape {tuple(masks.shape)} do not match the {tuple(x.shape[:2])} patches"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _prenorm(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return x

    def _outputs(self, x_prenorm: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        r = self.num_register_tokens
        x_norm = self.norm(x_prenorm)
        if self.has_sem:
            cls = self.norm(self.sem_project(x_prenorm[:, : 1 + r]))
        else:
            cls = x_norm[:, 0]
        return {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    # --------------------------------------------------------------- forward
    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None
    ) -> list[dict[str, Tensor | None]]:
        """One output dict per crop batch; every block is called once with the whole list."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} crop batches but {len(masks_list)} masks")
        tokens: list[Tensor] = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        layouts = self._packed_layouts(tokens) if self.pack_crops and len(tokens) > 1 else None
        for blk in self.blocks:
            tokens = blk(tokens) if layouts is None else blk(tokens, layouts=layouts)
        return [self._outputs(t, m) for t, m in zip(tokens, masks_list)]

    def _packed_layouts(self, tokens: list[Tensor]) -> dict[Any, PackedLayout]:
        """Every packed layout (and its attention mask) the blocks will ask for, built once per forward
        outside the blocks: the crop batches' own, and those of the stochastic-depth sample subsets."""
        segments = segments_of(tokens)
        needed: set[Any] = {segments}
        if self.training:
            for blk in self.iter_blocks():
                needed |= blk.packed_segments(segments)
        return {segs: _cached_layout(segs, self.attention, tokens[0].device) for segs in needed}

    def forward_features(
        self, x: TensorOrList, masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Dict with ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens``
        (B, N, D), ``x_prenorm`` (B, 1+R+N, D) and ``masks``.

        A list of image batches (crops of different sizes) gives a list of dicts.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(list(x), masks)  # type: ignore[arg-type]
        return self._outputs(self._prenorm(x, masks), masks)  # type: ignore[arg-type]

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """Training: the :meth:`forward_features` output; otherwise ``head(x_norm_clstoken)`` (B, D)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])  # type: ignore[index]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Outputs of the last ``n`` blocks (or of the blocks whose indices are in ``n``).

        Each output is the patch tokens (B, N, D) (``norm`` applies the final LayerNorm first),
        reshaped to (B, D, h, w) with ``reshape``; with ``return_class_token`` each item is a pair
        (patch tokens, CLS token (B, D) of the same, possibly normed, output).
        """
        b, _, h, w = x.shape
        tokens = self.prepare_tokens_with_masks(x)
        take = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        bad = [i for i in take if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range for a {self.n_blocks}-block model")
        outputs = []
        for i, blk in enumerate(self.iter_blocks()):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    # ------------------------------------------------------------------- SEM
    def _require_sem(self) -> None:
        if not self.has_sem:
            raise RuntimeError(
                "this backbone has no SEM bottleneck (built with L=0); build it with L > 0 and V"
            )

    def sem_raw(self, x: Tensor, temp: float | None = None, masks: Tensor | None = None) -> Tensor:
        """The raw SEM output (B, L*V): L softmax simplices at ``temp`` (default: the model's tau),
        i.e. the SEM vector before ``sem_out`` and the final norm; what the SEM linear probe reads."""
        self._require_sem()
        r = self.num_register_tokens
        return self.sem_simplex(self._prenorm(x, masks)[:, : 1 + r], temp)

    def dlc(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Discrete latent codes (B, L) long in [0, V): the argmax of each SEM simplex."""
        self._require_sem()
        r = self.num_register_tokens
        return self.sem_codes(self._prenorm(x, masks)[:, : 1 + r])


_ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4},
    "vit_giant2": {
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "mlp_ratio": 4,
        "ffn_layer": "swiglufused",
    },
}
RECIPE_SEM: dict[str, Any] = {"L": 512, "V": 256, "temp": 1.0}
TINY_SEM: dict[str, Any] = {"L": 64, "V": 16, "temp": 1.0}


def _make(
    arch: str, kwargs: dict[str, Any], sem_defaults: dict[str, Any] | None = None
) -> DinoVisionTransformer:
    merged = {**_ARCHS[arch], **(sem_defaults or {}), **kwargs}
    if sem_defaults is not None:
        check_sem(merged.get("L"), merged.get("V"), arch=f"{arch}_sem")
    return DinoVisionTransformer(**merged)


def vit_tiny(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-Ti for demos: embed 192, depth 12, 3 heads (override ``embed_dim``, ``depth``, ``num_heads``)."""
    return _make("vit_tiny", kwargs)


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: embed 384, depth 12, 6 heads."""
    return _make("vit_small", kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: embed 768, depth 12, 12 heads."""
    return _make("vit_base", kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: embed 1024, depth 24, 16 heads."""
    return _make("vit_large", kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-g: embed 1536, depth 40, 24 heads, fused SwiGLU FFN (``mlp.w12`` [8192, 1536], ``mlp.w3``
    [1536, 4096])."""
    return _make("vit_giant2", kwargs)


def vit_tiny_sem(**kwargs: Any) -> DinoVisionTransformer:
    """:func:`vit_tiny` with SEM, default L=64, V=16, tau=1."""
    return _make("vit_tiny", kwargs, TINY_SEM)


def vit_small_sem(**kwargs: Any) -> DinoVisionTransformer:
    """:func:`vit_small` with SEM, default L=512, V=256, tau=1 (the recipe's)."""
    return _make("vit_small", kwargs, RECIPE_SEM)


def vit_base_sem(**kwargs: Any) -> DinoVisionTransformer:
    """:func:`vit_base` with SEM, default L=512, V=256, tau=1 (the recipe's)."""
    return _make("vit_base", kwargs, RECIPE_SEM)


def vit_large_sem(**kwargs: Any) -> DinoVisionTransformer:
    """:func:`vit_large` with SEM, default L=512, V=256, tau=1 (the recipe's)."""
    return _make("vit_large", kwargs, RECIPE_SEM)


def vit_giant2_sem(**kwargs: Any) -> DinoVisionTransformer:
    """:func:`vit_giant2` with SEM, default L=512, V=256, tau=1 (the recipe's)."""
    return _make("vit_giant2", kwargs, RECIPE_SEM)


ARCHITECTURES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
    "vit_tiny_sem": vit_tiny_sem,
    "vit_small_sem": vit_small_sem,
    "vit_base_sem": vit_base_sem,
    "vit_large_sem": vit_large_sem,
    "vit_giant2_sem": vit_giant2_sem,
}
