"""The multi-crop augmentation: shapes, ranges, determinism, fidelity to torchvision, draft decoding."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2 as T2
from torchvision.transforms.v2 import functional as TF

from semlab.data.pipeline import augment as A
from semlab.data.pipeline.augment import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    CropParams,
    DataAugmentationDINO,
    decode_rgb,
    make_augmentation,
    make_eval_transform,
    make_probe_train_transform,
    sample_resized_crop_box,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def smooth_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful test image with some large structures (low-pass: good for resampling checks)."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    arr[(xx // (width // 5) + yy // (height // 4)) % 2 == 0] *= 0.6  # a coarse checkerboard
    return Image.fromarray(arr.astype(np.uint8))


def encode(img: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255.0


@pytest.fixture(scope="module")
def photo_bytes() -> bytes:
    return encode(smooth_photo(320, 240))


def test_output_shapes_and_ranges(photo_bytes: bytes) -> None:
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 64, 32)
    out = aug(photo_bytes, rng=0)
    assert set(out) == {"global_crops", "local_crops", "global_crops_teacher"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert out["global_crops_teacher"] == out["global_crops"]
    for crop in out["global_crops"]:
        assert crop.shape == (3, 64, 64) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, 32, 32)
    for crop in out["global_crops"] + out["local_crops"]:
        pixels = unnormalise(crop)
        assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
        assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # uint8-valued, as ToTensor of a PIL image


def test_determinism(photo_bytes: bytes) -> None:
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 48, 24)

    def flat(out: dict) -> torch.Tensor:
        return torch.cat([c.flatten() for c in out["global_crops"] + out["local_crops"]])

    a = flat(aug(photo_bytes, rng=123))
    assert torch.equal(a, flat(aug(photo_bytes, rng=np.random.default_rng(123))))
    assert torch.equal(a, flat(aug(photo_bytes, rng=123)))
    assert not torch.equal(a, flat(aug(photo_bytes, rng=124)))
    r1, r2 = random.Random(5), random.Random(5)
    assert torch.equal(flat(aug(photo_bytes, rng=r1)), flat(aug(photo_bytes, rng=r2)))
    # a PIL input and its bytes give the same crops when draft decoding is off
    exact = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 48, 24, use_draft=False)
    pil = Image.open(io.BytesIO(photo_bytes)).convert("RGB")
    assert torch.equal(flat(exact(photo_bytes, rng=9)), flat(exact(pil, rng=9)))


def test_parameter_statistics() -> None:
    ref = DataAugmentationDINO(local_crops_number=4)
    assert ref.blur_probs == pytest.approx((0.0, 0.9, 0.5))
    assert DataAugmentationDINO(blur_semantics="nominal").blur_probs == (1.0, 0.1, 0.5)
    rng = np.random.default_rng(0)
    draws = [ref.sample_params(640, 480, rng) for _ in range(2000)]
    g1 = [d[0][0] for d in draws]
    g2 = [d[0][1] for d in draws]
    loc = [p for d in draws for p in d[1]]

    def freq(params: list[CropParams], attr: str) -> float:
        flags = [p.blur_sigma is not None if attr == "blur" else bool(getattr(p, attr)) for p in params]
        return float(np.mean(flags))

    assert freq(g1, "blur") == 0.0 and freq(g2, "blur") == pytest.approx(0.9, abs=0.03)
    assert freq(loc, "blur") == pytest.approx(0.5, abs=0.03)
    assert freq(g1, "solarize") == 0.0 and freq(loc, "solarize") == 0.0
    assert freq(g2, "solarize") == pytest.approx(0.2, abs=0.03)
    assert freq(loc, "jitter") == pytest.approx(0.8, abs=0.02)
    assert freq(loc, "gray") == pytest.approx(0.2, abs=0.02)
    assert freq(loc, "flip") == pytest.approx(0.5, abs=0.02)
    factors = np.array([p.factors for p in loc])
    assert factors.min(0) == pytest.approx([0.6, 0.6, 0.8, -0.1], abs=0.01)
    assert factors.max(0) == pytest.approx([1.4, 1.4, 1.2, 0.1], abs=0.01)
    orders = {p.order for p in loc}
    assert len(orders) == 24  # every permutation of the four jitter operations occurs
    sigmas = np.array([p.blur_sigma for p in loc if p.blur_sigma is not None])
    assert 0.1 <= sigmas.min() < 0.2 and 1.9 < sigmas.max() <= 2.0


def test_resized_crop_boxes_follow_torchvision_distribution() -> None:
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        ours, ref = [], []
        for _ in range(1500):
            left, top, w, h = sample_resized_crop_box(640, 427, scale, rng)
            assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 427
            assert 0.74 <= w / h <= 1.35
            ours.append((w * h / (640 * 427), w / h, (left + w / 2) / 640))
            _, _, rh, rw = RandomResizedCrop.get_params(torch.empty(1, 427, 640), scale, (3 / 4, 4 / 3))
            ref.append((rw * rh / (640 * 427), rw / rh, 0.5))
        ours_a, ref_a = np.array(ours), np.array(ref)
        assert scale[0] * 0.9 <= ours_a[:, 0].min() and ours_a[:, 0].max() <= scale[1] * 1.02
        # same area and aspect distribution as torchvision (rejection included); centres spread evenly
        assert ours_a[:, 0].mean() == pytest.approx(ref_a[:, 0].mean(), rel=0.05)
        assert ours_a[:, 1].mean() == pytest.approx(ref_a[:, 1].mean(), rel=0.03)
        assert ours_a[:, 2].mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_match_torchvision(op: str) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 20, 24)).float()
    x[:, :3, :3] = 90.0  # gray pixels
    for factor in (0.6, 1.0, 1.37) if op != "hue" else (-0.1, -0.02, 0.0, 0.07, 0.1):
        ours = getattr(A, f"adjust_{op}")(x.clone(), factor)
        ref = getattr(TF, f"adjust_{op}")(x / 255.0, factor) * 255.0
        assert (ours - ref).abs().max() < 0.02, (op, factor)


def test_blur_and_grayscale_match_torchvision() -> None:
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, 30, 26)).float()
    for sigma in (0.1, 0.7, 2.0):
        ref = TF.gaussian_blur(x.unsqueeze(0), kernel_size=[9, 9], sigma=[sigma, sigma])[0]
        assert (A.gaussian_blur(x, sigma) - ref).abs().max() < 1e-3
    ref_gray = TF.rgb_to_grayscale(x.unsqueeze(0) / 255.0)[0, 0] * 255.0
    assert (A.gray(x) - ref_gray).abs().max() < 0.1


def plain_params(box: tuple[int, int, int, int], **kwargs) -> CropParams:
    fields = dict(
        flip=False,
        jitter=False,
        order=(0, 1, 2, 3),
        factors=(1.0, 1.0, 1.0, 0.0),
        gray=False,
        blur_sigma=None,
        solarize=False,
    )
    fields.update(kwargs)
    return CropParams(box=box, **fields)


def test_crop_matches_pil_reference_pipeline() -> None:
    img = smooth_photo(200, 150, seed=3)
    aug = DataAugmentationDINO(local_crops_number=0, global_crops_size=40, use_draft=False, fast_reduce=False)
    box = (30, 20, 90, 70)
    g = [plain_params(box), plain_params(box, flip=True)]
    out = aug.apply(img, g, [])["global_crops"]
    expected = img.crop((30, 20, 120, 90)).resize((40, 40), Image.Resampling.BICUBIC)
    ref = T2.Compose(
        [
            T2.PILToTensor(),
            T2.ToDtype(torch.float32, scale=True),
            T2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
    assert torch.allclose(out[0], ref(expected), atol=1e-5)
    assert torch.allclose(out[1], ref(expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), atol=1e-5)
    # grayscale gives equal channels; solarize inverts the values >= 128
    gray, sol = aug.apply(img, [plain_params(box, gray=True), plain_params(box, solarize=True)], [])[
        "global_crops"
    ]
    pixels = unnormalise(gray)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-3) and torch.allclose(pixels[1], pixels[2], atol=1e-3)
    plain = unnormalise(out[0]).round()
    solarized = torch.where(plain >= 128, 255 - plain, plain)
    assert torch.allclose(unnormalise(sol), solarized, atol=1e-3)


def test_draft_decoding_keeps_geometry() -> None:
    big = encode(smooth_photo(1280, 960, seed=4), quality=95)
    params = [plain_params((100, 80, 900, 700)), plain_params((300, 200, 640, 600))]
    exact = DataAugmentationDINO(
        local_crops_number=0, global_crops_size=96, use_draft=False, fast_reduce=False
    )
    drafted = DataAugmentationDINO(
        local_crops_number=0, global_crops_size=96, use_draft=True, fast_reduce=False
    )
    # the smallest box side is 600 = 6.25 x 96: the JPEG is decoded at 1/4 scale (320 x 240)
    img, scale = decode_rgb(big, min_reduction=min(min(p.box[2:]) / 96 for p in params))
    assert scale == 4.0 and img.size == (320, 240)
    a = exact.apply(big, params, [])["global_crops"]
    b = drafted.apply(big, params, [])["global_crops"]
    for x, y in zip(a, b):
        diff = (unnormalise(x) - unnormalise(y)).abs().mean()
        assert diff < 2.0, diff
    # a box shifted by 12 pixels of the full image differs much more: the check has power
    shifted = exact.apply(big, [plain_params((112, 92, 900, 700))], [])["global_crops"][0]
    draft_error = (unnormalise(a[0]) - unnormalise(b[0])).abs().mean()
    assert (unnormalise(shifted) - unnormalise(a[0])).abs().mean() > 2 * draft_error


def test_draft_not_used_when_a_crop_needs_full_resolution(photo_bytes: bytes) -> None:
    img, scale = decode_rgb(photo_bytes, min_reduction=1.5)
    assert scale == 1.0 and img.size == (320, 240)
    img, scale = decode_rgb(photo_bytes, min_reduction=4.5)
    assert scale == 4.0 and img.size == (80, 60)


def test_fast_reduce_close_to_direct_resize() -> None:
    img = smooth_photo(640, 480, seed=5)
    params = [plain_params((0, 0, 600, 450)), plain_params((50, 40, 300, 300))]
    fast = DataAugmentationDINO(local_crops_number=0, global_crops_size=64, fast_reduce=True).apply(
        img, params, []
    )
    exact = DataAugmentationDINO(local_crops_number=0, global_crops_size=64, fast_reduce=False).apply(
        img, params, []
    )
    for x, y in zip(fast["global_crops"], exact["global_crops"]):
        assert (unnormalise(x) - unnormalise(y)).abs().mean() < 2.0


def test_make_augmentation_from_config(photo_bytes: bytes) -> None:
    cfg = OmegaConf.create(
        {
            "crops": {
                "global_crops_scale": [0.32, 1.0],
                "local_crops_scale": [0.05, 0.32],
                "local_crops_number": 4,
                "global_crops_size": 70,
                "local_crops_size": 42,
            }
        }
    )
    aug = make_augmentation(cfg)
    out = aug(photo_bytes, rng=0)
    assert [c.shape for c in out["global_crops"]] == [(3, 70, 70)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 42, 42)] * 4
    with pytest.raises(ValueError, match="global_crops_scale"):
        DataAugmentationDINO(global_crops_scale=(0.5, 1.5))


def test_eval_and_probe_transforms(photo_bytes: bytes) -> None:
    x = make_eval_transform(resize=80, crop=70)(photo_bytes)
    assert x.shape == (3, 70, 70)
    y = make_probe_train_transform(crop=56)(Image.open(io.BytesIO(photo_bytes)).convert("L"))
    assert y.shape == (3, 56, 56)


def test_probe_crop_scale_is_configurable_and_checked(photo_bytes):
    """``linear.train_crop_scale`` reaches RandomResizedCrop; a reversed or empty range is refused."""
    from torchvision import transforms as T

    tf = make_probe_train_transform(crop=56, scale=(0.5, 1.0))
    rrc = next(t for t in tf.transforms if isinstance(t, T.RandomResizedCrop))
    assert tuple(rrc.scale) == (0.5, 1.0)
    assert tf(Image.open(io.BytesIO(photo_bytes))).shape == (3, 56, 56)
    steps = make_probe_train_transform(crop=56).transforms
    default = next(t for t in steps if isinstance(t, T.RandomResizedCrop))
    assert tuple(default.scale) == (0.08, 1.0)  # the reference's
    for bad in ((0.6, 0.5), (0.0, 1.0), (0.5, 1.5)):
        with pytest.raises(ValueError, match="train_crop_scale"):
            make_probe_train_transform(crop=56, scale=bad)
