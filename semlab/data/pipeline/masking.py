"""BEiT-style block masking of the patch grid, for iBOT's masked-patch objective.

``MaskingGenerator(input_size=(h, w), ...)(n)`` returns a boolean (h, w) mask with about ``n`` patches
set, built from rectangular blocks. Each block: area ``a ~ U[min_num_patches, max_block]`` with
``max_block = min(n - masked so far, max_num_patches)``, aspect
``r = exp(U[log min_aspect, log max_aspect])``, ``bh = round(sqrt(a r))``, ``bw = round(sqrt(a / r))``
(smaller than the grid), at a uniform position; the block is kept if it adds between 1 and
``max_block`` new patches (10 tries per block). Blocks are added until ``n`` patches are masked or a
block cannot be placed, so the result has at most ``n`` patches (fewer when the last block does not fit).
"""

from __future__ import annotations

import math
import random as _pyrandom
from typing import Any

import numpy as np


class UniformSource:
    """``uniform(a, b)``, ``randint(a, b)`` (inclusive) and ``shuffle(list)`` over a ``random.Random``, a
    ``numpy.random.Generator``, an int seed or None (the ``random`` module's global state)."""

    def __init__(self, rng: Any = None) -> None:
        if isinstance(rng, UniformSource):
            rng = rng.rng
        elif isinstance(rng, int | np.integer) and not isinstance(rng, bool):
            rng = _pyrandom.Random(int(rng))
        elif rng is not None and not isinstance(rng, _pyrandom.Random | np.random.Generator):
            raise TypeError(
                f"expected random.Random, numpy Generator, int seed or None, got {type(rng).__name__}"
            )
        self.rng = rng

    def uniform(self, a: float, b: float) -> float:
        if isinstance(self.rng, np.random.Generator):
            return a + (b - a) * float(self.rng.random())
        return (self.rng or _pyrandom).uniform(a, b)

    def randint(self, a: int, b: int) -> int:
        if isinstance(self.rng, np.random.Generator):
            return int(self.rng.integers(a, b + 1))
        return (self.rng or _pyrandom).randint(a, b)

    def shuffle(self, items: list) -> None:
        if isinstance(self.rng, np.random.Generator):
            order = self.rng.permutation(len(items))
            items[:] = [items[i] for i in order]
        else:
            (self.rng or _pyrandom).shuffle(items)


class MaskingGenerator:
    """Block masks for a ``(height, width)`` patch grid (see the module docstring)."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if not isinstance(input_size, tuple | list):
            input_size = (int(input_size), int(input_size))
        self.height, self.width = (int(v) for v in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0 < min_aspect:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> {self.num_masking_patches}, max = "
            f"{self.max_num_patches}, min = {self.min_num_patches}, log_aspect = {self.log_aspect_ratio})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: UniformSource) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int | None = None, rng: Any = None) -> np.ndarray:
        """A boolean (height, width) mask with at most ``num_masking_patches`` patches set (default: the
        constructor's ``num_masking_patches``, else 0). ``rng``: ``random.Random``, numpy Generator, seed
        or None (global ``random``)."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        source = UniformSource(rng)
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, source)
            if delta == 0:
                break
            count += delta
        return mask
