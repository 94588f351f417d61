"""Attention kernels, and crop batches of different sizes packed into one token sequence.

Every kernel computes, per head, ``softmax(q k^T / sqrt(d_h)) v`` over the tokens of one image crop.

Kernels (``student.attention``; the choice is explicit, never made behind the user's back):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math,
  picked by torch per call);
- ``flex``: ``torch.nn.attention.flex_attention`` (compiled on CUDA; eager forward only on CPU);
- ``xformers``: ``xformers.ops.memory_efficient_attention``; an error if xFormers is not importable.

Packing (``student.pack_crops``). The student sees ``2B`` global crops of ``n_g`` tokens and ``8B``
local crops of ``n_l`` tokens. Packed, the crop batches become one sequence of
``T = 2B n_g + 8B n_l`` tokens, shape (1, T, D), so that every linear layer of a block runs once, as
one matrix product, instead of once per crop size. Attention must still stay inside each crop: with
``doc(t)`` the index of the crop that token ``t`` belongs to, the mask is block diagonal,

    allowed(q, k) = [doc(q) == doc(k)],

which ``flex`` applies as a document mask in one call, ``xformers`` as its ``BlockDiagonalMask`` (what
the reference DINOv2 code does) and ``sdpa`` by splitting the sequence back per crop size (one SDPA
call per size: the "two-pass" attention, with the linear layers still packed).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_KERNELS = ("sdpa", "flex", "xformers")
FLEX_BLOCK = 128  # flex_attention's default sparse block size (queries and keys)


class AttentionKernelError(ValueError):
    """The configured attention kernel cannot run here; the message says what to change."""


def check_kernel(name: str) -> str:
    """``name`` if it is a known kernel (and, for ``xformers``, importable), else a clear error."""
    if name not in ATTENTION_KERNELS:
        raise AttentionKernelError(
            f"unknown student.attention '{name}': use one of {', '.join(ATTENTION_KERNELS)}"
        )
    if name == "xformers" and xformers_ops() is None:
        raise AttentionKernelError(
            "student.attention=xformers but xFormers is not importable (or XFORMERS_DISABLED is set). "
            "No xFormers release on PyPI is built against semlab's pinned torch (README, 'Attention "
            "kernels'); use student.attention=sdpa or flex"
        )
    return name


@functools.lru_cache(maxsize=1)
def xformers_ops() -> Any | None:
    """``xformers.ops`` when installed and not disabled by ``XFORMERS_DISABLED``, else None."""
    if os.environ.get("XFORMERS_DISABLED"):
        return None
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except ImportError:
        return None
    return xops


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any = None) -> Tensor:
    """flex_attention on (B, H, N, d_h) tensors: the compiled kernel on CUDA, the eager one elsewhere
    (CPU: forward only, torch has no CPU backward for it)."""
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    import warnings

    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    with warnings.catch_warnings():  # "unfused implementation": expected off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return eager_flex(q, k, v, block_mask=block_mask)


def document_block_mask(lengths: Sequence[int], device: torch.device | str) -> Any:
    """A flex ``BlockMask`` for documents of ``lengths`` tokens laid end to end (block diagonal).

    Built from the document boundaries, not from a dense T x T mask (T is ~61k tokens for the
    recipe's batch of 64): for a query block covering documents ``d0..d1`` the key blocks that can
    hold an allowed pair are those overlapping ``[start(d0), end(d1))``; a block pair is *full* (no
    mask evaluation needed) when both blocks lie inside a single document, otherwise *partial* and
    ``mask_mod`` decides per token pair.
    """
    from torch.nn.attention.flex_attention import BlockMask

    lengths_t = torch.as_tensor(list(lengths), dtype=torch.long)
    total = int(lengths_t.sum())
    ends = torch.cumsum(lengths_t, 0)
    starts = ends - lengths_t
    doc = torch.repeat_interleave(torch.arange(len(lengths_t)), lengths_t)
    n_blocks = -(-total // FLEX_BLOCK)
    partial: list[list[int]] = []
    full: list[list[int]] = []
    for i in range(n_blocks):
        q0, q1 = i * FLEX_BLOCK, min((i + 1) * FLEX_BLOCK, total)
        d0, d1 = int(doc[q0]), int(doc[q1 - 1])
        k0, k1 = int(starts[d0]), int(ends[d1])
        row_partial, row_full = [], []
        for j in range(k0 // FLEX_BLOCK, -(-k1 // FLEX_BLOCK)):
            b0, b1 = j * FLEX_BLOCK, min((j + 1) * FLEX_BLOCK, total)
            inside = d0 == d1 and (i + 1) * FLEX_BLOCK <= total and (j + 1) * FLEX_BLOCK <= total
            inside = inside and b0 >= int(starts[d0]) and b1 <= int(ends[d0])
            (row_full if inside else row_partial).append(j)
        partial.append(row_partial)
        full.append(row_full)

    def as_tensors(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        num = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        idx = torch.zeros(n_blocks, n_blocks, dtype=torch.int32)  # BlockMask's layout: one slot per KV block
        for r, row in enumerate(rows):
            idx[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
        return num.view(1, 1, -1).to(device), idx.view(1, 1, n_blocks, n_blocks).to(device)

    doc_dev = doc.to(device)

    def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return doc_dev[q_idx] == doc_dev[kv_idx]

    kv_num, kv_idx = as_tensors(partial)
    full_num, full_idx = as_tensors(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=same_document,
        seq_lengths=(total, total),
    )


@dataclass
class PackedLayout:
    """Crop batches laid end to end in one sequence: segment ``i`` holds ``batch_i`` crops of ``tokens_i``
    tokens. ``pack`` / ``unpack`` convert between the list of (B_i, N_i, D) tensors and (1, T, D)."""

    segments: tuple[tuple[int, int], ...]
    kernel: str
    block_mask: Any = None  # flex
    attn_bias: Any = None  # xformers
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [b * n for b, n in self.segments]

    def pack(self, xs: Sequence[Tensor]) -> Tensor:
        return torch.cat([x.reshape(1, -1, x.shape[-1]) for x in xs], dim=1)

    def unpack(self, x: Tensor) -> list[Tensor]:
        parts = x.split(self.lengths, dim=1)
        return [p.reshape(b, n, p.shape[-1]) for p, (b, n) in zip(parts, self.segments)]


def make_layout(segments: Sequence[tuple[int, int]], kernel: str, device: torch.device | str) -> PackedLayout:
    """The packed layout of crop batches ``segments`` = [(batch, tokens), ...] for ``kernel`` (its mask
    built once here, outside the blocks, and shared by all of them)."""
    segs = tuple((int(b), int(n)) for b, n in segments)
    layout = PackedLayout(segs, kernel)
    seq_lengths = [n for b, n in segs for _ in range(b)]
    if kernel == "flex":
        layout.block_mask = document_block_mask(seq_lengths, device)
    elif kernel == "xformers":
        xops = xformers_ops()
        if xops is None:
            check_kernel("xformers")
        layout.attn_bias = xops.fmha.BlockDiagonalMask.from_seqlens(seq_lengths)
    return layout


def attend(q: Tensor, k: Tensor, v: Tensor, kernel: str, dropout_p: float = 0.0) -> Tensor:
    """Attention of (B, N, H, d_h) tensors (one crop per row) -> (B, N, H, d_h)."""
    if kernel == "xformers":
        xops = xformers_ops()
        if xops is None:
            check_kernel("xformers")
        return xops.memory_efficient_attention(q, k, v, p=dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d_h)
    if kernel == "flex":
        if dropout_p:
            raise AttentionKernelError("student.attention=flex has no attention dropout; use sdpa")
        out = flex_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return out.transpose(1, 2)


def attend_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, dropout_p: float = 0.0) -> Tensor:
    """Block-diagonal attention of packed (1, T, H, d_h) tensors -> (1, T, H, d_h) (module docstring)."""
    kernel = layout.kernel
    if kernel == "xformers":
        xops = xformers_ops()
        return xops.memory_efficient_attention(q, k, v, attn_bias=layout.attn_bias, p=dropout_p)
    if kernel == "flex":
        if dropout_p:
            raise AttentionKernelError("student.attention=flex has no attention dropout; use sdpa")
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout.block_mask)
        return out.transpose(1, 2)
    outs = []  # sdpa: one call per crop size
    for qs, ks, vs, (b, n) in zip(
        q.split(layout.lengths, 1), k.split(layout.lengths, 1), v.split(layout.lengths, 1), layout.segments
    ):
        shape = (b, n, *q.shape[2:])
        outs.append(attend(qs.reshape(shape), ks.reshape(shape), vs.reshape(shape), "sdpa", dropout_p))
    return torch.cat([o.reshape(1, -1, *q.shape[2:]) for o in outs], dim=1)
