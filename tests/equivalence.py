"""Comparing a fast variant with the eager step: tensors equal up to float32 rounding at their scale."""

from __future__ import annotations

import torch


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = ""
) -> None:
    """``max |actual - expected| <= rel * max |expected|`` (+ 1e-12): an elementwise relative test fails on
    entries that are near zero only because of cancellation, so the tolerance follows the tensor's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"


def assert_dicts_close(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    for key in expected:
        assert_close_to_scale(actual[key], expected[key], rel, what=str(key))
