"""DINOv2 multi-crop augmentation, computed fast: decode once, crop before resizing, colour on small tensors.

The recipe (DINOv2 ``DataAugmentationDINO``), for one image:

- geometry, per crop: ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic)`` then horizontal flip
  with probability 0.5;
- colour, per crop: with probability 0.8 ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2,
  hue=0.1)`` (the four operations in a random order, factors ``b, c, s ~ U[1-x, 1+x]``, hue shift
  ``h ~ U[-0.1, 0.1]`` of a turn), then grayscale with probability 0.2;
- Gaussian blur (kernel 9, ``sigma ~ U[0.1, 2.0]``, reflect padding): nominal probabilities 1.0 for
  global crop 1, 0.1 for global crop 2, 0.5 for local crops; global crop 2 is then solarized
  (``x >= 128 -> 255 - x``) with probability 0.2;
- ``ToTensor`` + ``Normalize`` with the ImageNet mean/std.

Blur probabilities: the reference code wraps torchvision's ``RandomApply`` with ``p = 1 - p_nominal``
(DINOv2 ``GaussianBlur``, see facebookresearch/dinov2#411), so the released models were trained with
the blur applied with probability 0.0 (global 1), 0.9 (global 2) and 0.5 (local). ``blur_semantics=
"reference"`` (the default) reproduces that; ``"nominal"`` applies the stated probabilities.

How it is fast (same distribution as the PIL/torchvision pipeline):

- all random parameters are drawn first, in one call, from one ``numpy.random.Generator``; crop boxes are
  sampled on the original size read from the file header;
- JPEG bytes are decoded once, in PIL draft mode (libjpeg DCT scaling by 1/2, 1/4 or 1/8) when every
  crop box is at least twice its output size; boxes are then mapped to the drafted image (``x / s``);
- each crop is cut out of the decoded image, then resized (bicubic with antialias; a fractional box after
  draft or reduction is resampled exactly with ``Image.resize(box=...)``). With
  ``fast_reduce`` a crop whose box is at least 2x (4x) its output size is resized from a 2x2 (4x4)
  box-averaged copy of the decoded image (made once per image), as PIL's ``reducing_gap`` does: the crop
  is still downsampled by bicubic, about 1.5/255 mean absolute difference from the direct resize;
- colour jitter, grayscale, blur (separable kernel as shifted multiply-adds), solarize and normalisation
  run per crop on float tensors of the crop size (small enough to stay in cache). Colour operations follow
  torchvision's tensor semantics on values in [0, 255] (each blend clamps); values are rounded to
  integers after the colour operations and after the blur, as the uint8 reference pipeline does.
"""

from __future__ import annotations

import contextlib
import io
import math
import random as _pyrandom
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
BLUR_KERNEL_SIZE = 9
RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

RngLike = np.random.Generator | _pyrandom.Random | int | None


def as_generator(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a seed, a Generator (returned as is), a ``random.Random`` (64 bits
    drawn from it seed a new Generator) or None (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, _pyrandom.Random):
        return np.random.default_rng(rng.getrandbits(64))
    if rng is None or isinstance(rng, int | np.integer):
        return np.random.default_rng(rng)
    raise TypeError(
        f"rng must be a numpy Generator, random.Random, int seed or None, not {type(rng).__name__}"
    )


def sample_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    rng: RngLike = None,
    ratio: Sequence[float] = RESIZED_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box ``(left, top, w, h)`` with torchvision's distribution.

    Up to 10 tries: area ``a ~ U[scale] * W * H``, aspect ``r = exp(U[log ratio])``, ``w = round(sqrt(a r))``,
    ``h = round(sqrt(a / r))``; the first that fits is placed at a uniform integer position. If none fits,
    a centre crop of the whole image clamped to the ratio range.
    """
    return _resized_crop_box_from_uniforms(width, height, scale, as_generator(rng).random(22), ratio)


# 20 (10 crop tries) + 2 (position) + flip + 4 (order) + 4 (factors) + jitter, gray, sigma, blur, solarize
_UNIFORMS_PER_CROP = 36


def _resized_crop_box_from_uniforms(
    width: int,
    height: int,
    scale: Sequence[float],
    u: np.ndarray,
    ratio: Sequence[float] = RESIZED_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """The RandomResizedCrop box from 22 uniforms: 10 x (area, log-aspect) tries, then (top, left)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u[2 * t]))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[2 * t + 1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(float(u[20]) * (height - h + 1)), height - h)
            left = min(int(float(u[21]) * (width - w + 1)), width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def open_image(image: Image.Image | bytes | bytearray | memoryview) -> Image.Image:
    """A PIL image from encoded bytes (header read, pixels not decoded yet) or a PIL image as is."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(image)))
    raise TypeError(f"expected a PIL image or encoded image bytes, got {type(image).__name__}")


def decode_rgb(image: Image.Image | bytes, min_reduction: float = 1.0) -> tuple[Image.Image, float]:
    """Decode to RGB once, in JPEG draft mode when allowed; returns ``(image, s)``.

    ``min_reduction`` is the smallest ratio (crop box side / output side) over every crop that will be taken;
    the largest JPEG DCT scale ``s`` in {8, 4, 2} with ``s <= min_reduction`` is used, so no crop is upsampled
    more than it would be from the full image. A point ``x`` of the original maps to ``x / s``.
    """
    img = open_image(image)
    s = 1
    if min_reduction >= 2.0 and getattr(img, "format", None) in ("JPEG", "MPO") and not _is_loaded(img):
        wanted = next(c for c in (8, 4, 2) if c <= min_reduction)
        result = img.draft("RGB", (max(1, img.width // wanted), max(1, img.height // wanted)))
        if result is not None:
            s = img.decoderconfig[0] if getattr(img, "decoderconfig", None) else 1
    if img.mode != "RGB":
        img = img.convert("RGB")
    else:
        img.load()
    return img, float(s)


def _is_loaded(img: Image.Image) -> bool:
    """Decoded already (a file image keeps its ``tile`` list until it is loaded)."""
    return not getattr(img, "tile", None)


class _Pyramid:
    """The decoded image (at draft scale ``s``) and, on demand, its 2x2 / 4x4 box-reduced copies.

    ``level_for(reduction)`` returns ``(image, scale)`` with the largest scale ``s * 2^j`` (j <= 2) such that
    a crop whose box is ``reduction`` times its output size (in original pixels) is still downsampled from
    that level; a point ``x`` of the original is ``x / scale`` there.
    """

    def __init__(self, image: Image.Image, scale: float) -> None:
        self.scale = scale
        self.levels: dict[int, Image.Image] = {1: image}

    def level_for(self, reduction: float) -> tuple[Image.Image, float]:
        factor = 1
        while factor < 4 and reduction / self.scale >= 2 * factor:
            factor *= 2
        if factor not in self.levels:
            self.levels[factor] = self.levels[1].reduce(factor)
        return self.levels[factor], self.scale * factor


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block (restored after). The per-crop tensors are small, so
    intra-op threads only add synchronisation, which costs milliseconds per op on a loaded machine; data
    loader workers are single-threaded already, this matters when augmenting in the main process."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gaussian_kernel1d(sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Normalised ``exp(-t^2 / (2 sigma^2))`` at ``t = -(k-1)/2 .. (k-1)/2`` (torchvision's kernel)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (t / sigma) ** 2)
    return (pdf / pdf.sum()).float()


# ---- colour operations on one float crop (3, H, W) with values in [0, 255], in place where possible -------
# One crop at a time keeps the working set in the CPU's L2 cache, which matters more than batching here.


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` of (3, H, W) as (H, W)."""
    out = x[0] * GRAY_WEIGHTS[0]
    out.add_(x[1], alpha=GRAY_WEIGHTS[1]).add_(x[2], alpha=GRAY_WEIGHTS[2])
    return out


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clamp(f x)``: blend with black."""
    return x.mul_(factor).clamp_(0.0, 255.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clamp(f x + (1 - f) mean(gray(x)))``: blend with the crop's mean luma."""
    mean = float(gray(x).mean())
    return x.mul_(factor).add_((1.0 - factor) * mean).clamp_(0.0, 255.0)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clamp(f x + (1 - f) gray(x))``: blend with the crop's own luma."""
    g = gray(x).mul_(1.0 - factor)
    return x.mul_(factor).add_(g).clamp_(0.0, 255.0)


_HUE_CENTRES = torch.tensor([3.0, 5.0, 1.0]).view(3, 1, 1)  # where each channel's ramp is 1 (R, G, B)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns, keeping V = max and S (so max and min of RGB are kept).

    With ``M = max``, ``m = min``, ``C = M - m``, the hexagonal hue is ``h6 = (g - b)/C`` if M is R,
    ``(b - r)/C + 2`` if G, else ``(r - g)/C + 4``; ``h = (h6 + 6 shift) mod 6``. The HSV -> RGB formula
    ``c = M - C ramp_c(h)`` has ``ramp_c(h) = clamp(2 - d(h, a_c), 0, 1)``, ``d`` the distance on the circle
    of length 6 and ``a = (3, 5, 1)`` for (R, G, B). Gray pixels (C = 0) are unchanged. Branch-free
    arithmetic (masks as 0/1 factors), which is fast on CPU.
    """
    r, g, b = x.unbind(0)
    maxc = x.amax(dim=0)
    chroma = maxc - x.amin(dim=0)
    eq_r = maxc == r
    is_r = eq_r.float()
    is_g = ((maxc == g) & ~eq_r).float()
    # h6 * C = is_r (g - b) + is_g (b - r + 2C) + (1 - is_r - is_g) (r - g + 4C); gray pixels give 0
    base = (r - g).add_(chroma, alpha=4.0)
    h = (g - b).sub_(base).mul_(is_r)
    h.add_((b - r).add_(chroma, alpha=2.0).sub_(base).mul_(is_g)).add_(base)
    h.mul_(chroma.clamp_min(1e-6).reciprocal_()).add_(6.0 * shift)  # in [-1.6, 5.6)
    h.add_((h < 0).float().mul_(6.0))  # mod 6
    dist = (h.unsqueeze(0) - _HUE_CENTRES).abs_()  # in [0, 5)
    dist = torch.minimum(dist, torch.rsub(dist, 6.0))
    ramp = torch.rsub(dist, 2.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma).neg_().add_(maxc)


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Blur (C, H, W) with a separable Gaussian kernel and reflect padding of ``k // 2``.

    ``y = sum_i k_i x[..., j + i]`` along W, then the same along H, on the padded crop (shifted multiply-adds:
    much faster on CPU than torch's depthwise 9 x 9 convolution, same result up to float rounding).
    """
    c, h, w = x.shape
    pad = kernel_size // 2
    weights = gaussian_kernel1d(sigma, kernel_size).tolist()
    padded = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")[0]
    rows = padded[..., 0:w] * weights[0]
    for i in range(1, kernel_size):
        rows.add_(padded[..., i : i + w], alpha=weights[i])
    out = rows[:, 0:h] * weights[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, i : i + h], alpha=weights[i])
    return out


# ---- the multi-crop transform ------------------------------------------------------------------------


@dataclass
class CropParams:
    """Every random choice for one crop (drawn up front, in a fixed order, from one Generator)."""

    box: tuple[int, int, int, int]  # left, top, width, height on the original image
    flip: bool
    jitter: bool
    order: tuple[int, int, int, int]  # permutation of (brightness, contrast, saturation, hue)
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation factors; hue shift
    gray: bool
    blur_sigma: float | None
    solarize: bool


class DataAugmentationDINO:
    """DINOv2 multi-crop augmentation: 2 global crops and ``local_crops_number`` local crops.

    ``__call__(image, rng=None)`` takes a PIL image or encoded bytes and returns ``{"global_crops": [2 x
    (3, G, G)], "local_crops": [n x (3, l, l)], "global_crops_teacher": the same 2 global tensors}``,
    float32, normalised with the ImageNet mean/std (``emit_uint8``: the uint8 pixels before the
    normalisation, for :mod:`semlab.data.pipeline.normalize` to finish on the device). ``rng`` (seed,
    ``numpy.random.Generator`` or ``random.Random``) makes the crops reproducible; None draws fresh entropy.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        *,
        blur_semantics: str = "reference",
        use_draft: bool = True,
        fast_reduce: bool = True,
        emit_uint8: bool = False,
    ) -> None:
        scales = {"global_crops_scale": global_crops_scale, "local_crops_scale": local_crops_scale}
        for name, sc in scales.items():
            if len(sc) != 2 or not 0.0 < float(sc[0]) <= float(sc[1]) <= 1.0:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(sc)}")
        if int(local_crops_number) < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if int(global_crops_size) <= 0 or int(local_crops_size) <= 0:
            raise ValueError(f"crop sizes must be positive, got {global_crops_size}, {local_crops_size}")
        if blur_semantics not in ("reference", "nominal"):
            raise ValueError(f"blur_semantics must be 'reference' or 'nominal', got {blur_semantics!r}")
        self.global_crops_scale = (float(global_crops_scale[0]), float(global_crops_scale[1]))
        self.local_crops_scale = (float(local_crops_scale[0]), float(local_crops_scale[1]))
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_semantics = blur_semantics
        self.use_draft = use_draft
        self.fast_reduce = fast_reduce
        self.emit_uint8 = bool(emit_uint8)  # stop before the normalisation (done on the device)
        nominal = (1.0, 0.1, 0.5)  # global 1, global 2, local
        self.blur_probs = nominal if blur_semantics == "nominal" else tuple(1.0 - p for p in nominal)
        self.solarize_prob = 0.2
        self.jitter_prob = 0.8
        self.jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
        self.gray_prob = 0.2
        self.blur_sigma = (0.1, 2.0)
        from semlab.data.pipeline.normalize import norm_constants  # it imports this module's mean/std

        self._norm_scale, self._norm_shift = norm_constants()  # x_norm = x * scale + shift

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global_crops_scale={self.global_crops_scale}, local_crops_scale="
            f"{self.local_crops_scale}, local_crops_number={self.local_crops_number}, global_crops_size="
            f"{self.global_crops_size}, local_crops_size={self.local_crops_size}, blur_semantics="
            f"{self.blur_semantics!r})"
        )

    # -- parameters --------------------------------------------------------------------------------------

    def _crop_params(
        self,
        width: int,
        height: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        u: np.ndarray,
    ) -> CropParams:
        """One crop's parameters from 36 uniforms in [0, 1) (all draws from one vectorised call)."""
        box = _resized_crop_box_from_uniforms(width, height, scale, u[:22])
        b, c, s, h = self.jitter
        factors = (
            1.0 - b + 2.0 * b * float(u[27]),
            1.0 - c + 2.0 * c * float(u[28]),
            1.0 - s + 2.0 * s * float(u[29]),
            -h + 2.0 * h * float(u[30]),
        )
        order = tuple(int(i) for i in np.argsort(u[23:27], kind="stable"))  # a uniform random permutation
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * float(u[33])
        return CropParams(
            box=box,
            flip=bool(u[22] < 0.5),
            jitter=bool(u[31] < self.jitter_prob),
            order=order,  # type: ignore[arg-type]
            factors=factors,
            gray=bool(u[32] < self.gray_prob),
            blur_sigma=sigma if u[34] < blur_p else None,
            solarize=bool(u[35] < solarize_p),
        )

    def sample_params(
        self, width: int, height: int, rng: RngLike = None
    ) -> tuple[list[CropParams], list[CropParams]]:
        """All random choices for an image of size (width, height): (global params, local params)."""
        u = as_generator(rng).random((2 + self.local_crops_number, _UNIFORMS_PER_CROP))
        gs, solarize = self.global_crops_scale, self.solarize_prob
        g1 = self._crop_params(width, height, gs, self.blur_probs[0], 0.0, u[0])
        g2 = self._crop_params(width, height, gs, self.blur_probs[1], solarize, u[1])
        locs = [
            self._crop_params(width, height, self.local_crops_scale, self.blur_probs[2], 0.0, u[2 + i])
            for i in range(self.local_crops_number)
        ]
        return [g1, g2], locs

    # -- pixels ------------------------------------------------------------------------------------------

    def _resize_crop(self, source: _Pyramid, p: CropParams, size: int) -> torch.Tensor:
        """Crop+resize the box from the coarsest source level that still downsamples it, flip;
        float (3, size, size) in [0, 255]."""
        left, top, w, h = p.box
        img, s = source.level_for(min(w, h) / size if self.fast_reduce else 1.0)
        x0, y0, x1, y1 = left / s, top / s, (left + w) / s, (top + h) / s
        # crop first (as torchvision: the resampling filter sees only the box), on the integer bounding box
        # when the box is fractional at this level, then resample the exact box
        ix0, iy0 = math.floor(x0), math.floor(y0)
        ix1, iy1 = min(math.ceil(x1), img.width), min(math.ceil(y1), img.height)
        region = img.crop((ix0, iy0, ix1, iy1))
        box = (x0 - ix0, y0 - iy0, min(x1 - ix0, ix1 - ix0), min(y1 - iy0, iy1 - iy0))
        crop = region.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if p.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        hwc = torch.from_numpy(np.array(crop))  # a writable copy (PIL's buffer is read-only)
        return torch.empty((3, size, size), dtype=torch.float32).copy_(hwc.permute(2, 0, 1))

    def _finish_crop(self, x: torch.Tensor, p: CropParams) -> torch.Tensor:
        """Jitter (in the crop's random op order), grayscale, blur, solarize, normalise one (3, H, W) crop."""
        if p.jitter:
            for op in p.order:
                x = _COLOR_OPS[op](x, p.factors[op])
        if p.gray:
            x = gray(x).expand(3, -1, -1).clone()
        x = x.round_()
        if p.blur_sigma is not None:
            x = gaussian_blur(x, p.blur_sigma).round_().clamp_(0.0, 255.0)
        if p.solarize:
            x = x.add_((x >= 128.0).float().mul_(x.mul(-2.0).add_(255.0)))  # x >= 128 -> 255 - x
        if self.emit_uint8:  # integers in [0, 255] here: exact
            return x.to(torch.uint8)
        return x.mul_(self._norm_scale).add_(self._norm_shift)

    def apply(
        self, image: Image.Image | bytes, global_params: list[CropParams], local_params: list[CropParams]
    ) -> dict[str, list[torch.Tensor]]:
        """Run the augmentation with given parameters (boxes relative to the original image size)."""
        img = open_image(image)
        min_reduction = 1.0
        if self.use_draft:
            gsize, lsize = self.global_crops_size, self.local_crops_size
            min_reduction = min(
                [min(p.box[2], p.box[3]) / gsize for p in global_params]
                + [min(p.box[2], p.box[3]) / lsize for p in local_params],
                default=1.0,
            )
        source = _Pyramid(*decode_rgb(img, min_reduction))
        with single_thread():
            return self._crops(source, global_params, local_params)

    def _crops(
        self, source: _Pyramid, global_params: list[CropParams], local_params: list[CropParams]
    ) -> dict[str, list[torch.Tensor]]:
        global_crops = [
            self._finish_crop(self._resize_crop(source, p, self.global_crops_size), p) for p in global_params
        ]
        local_crops = [
            self._finish_crop(self._resize_crop(source, p, self.local_crops_size), p) for p in local_params
        ]
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "global_crops_teacher": global_crops,
        }

    def __call__(self, image: Image.Image | bytes, rng: RngLike = None) -> dict[str, list[torch.Tensor]]:
        img = open_image(image)
        global_params, local_params = self.sample_params(img.width, img.height, rng)
        return self.apply(img, global_params, local_params)


def make_augmentation(cfg: Any, **kwargs: Any) -> DataAugmentationDINO:
    """Build :class:`DataAugmentationDINO` from ``cfg.crops`` (DINOv2 key names); ``cfg.crops.blur_semantics``
    is read when present. Extra keyword arguments go to the constructor."""
    crops = cfg.crops
    blur = crops.get("blur_semantics", "reference") if hasattr(crops, "get") else "reference"
    kwargs.setdefault("blur_semantics", blur)
    data = cfg.get("data", None) if hasattr(cfg, "get") else None
    if data is not None and data.get("normalize_on_device", False):
        kwargs.setdefault("emit_uint8", True)
    return DataAugmentationDINO(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=int(crops.local_crops_number),
        global_crops_size=int(crops.global_crops_size),
        local_crops_size=int(crops.local_crops_size),
        **kwargs,
    )


# ---- evaluation / linear-probe transforms (DINOv2's classification transforms) ----------------------


def to_rgb_pil(image: Image.Image | bytes) -> Image.Image:
    """Encoded bytes or a PIL image of any mode -> a loaded RGB PIL image."""
    img = open_image(image)
    return img if img.mode == "RGB" else img.convert("RGB")


def make_eval_transform(resize: int = 256, crop: int = 224) -> Callable[[Any], torch.Tensor]:
    """``Resize(resize, bicubic)`` (shorter side) + ``CenterCrop(crop)`` + ``ToTensor`` + ImageNet
    ``Normalize``; takes a PIL image or encoded bytes."""
    from torchvision import transforms as T

    return T.Compose(
        [
            to_rgb_pil,
            T.Resize(int(resize), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(int(crop)),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def make_probe_train_transform(
    crop: int = 224, hflip_prob: float = 0.5, scale: tuple[float, float] = (0.08, 1.0)
) -> Callable[[Any], torch.Tensor]:
    """The linear probe's training augmentation: ``RandomResizedCrop(crop, scale, bicubic)`` (the
    reference's scale 0.08-1 by default) + horizontal flip + ``ToTensor`` + ImageNet ``Normalize``;
    takes a PIL image or encoded bytes."""
    from torchvision import transforms as T

    lo, hi = (float(v) for v in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"linear.train_crop_scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
    steps: list[Any] = [
        to_rgb_pil, T.RandomResizedCrop(int(crop), scale=(lo, hi), interpolation=T.InterpolationMode.BICUBIC)
    ]
    if hflip_prob > 0:
        steps.append(T.RandomHorizontalFlip(hflip_prob))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(steps)
