"""Make config values safe to record in MLflow: no credentials, within MLflow's size limits.

- A key that names a credential (``password``, ``token``, ``secret``, ``api_key``...; whole words,
  so ``student.num_register_tokens`` is kept) is dropped.
- User info in any URI inside a value (``https://user:pw@host``) becomes ``***@``, and so does the
  value of a credential-named query parameter (``?sig=``, ``X-Amz-Signature=``, ``token=``);
  the rule is :mod:`semlab.utils.redact`, shared with the config files a run writes.
- Values longer than MLflow's limit (6000 characters for params, 8000 for tags) are cut and
  end with ``...[truncated N chars]`` so a reader sees that they were cut.
- Metric names keep MLflow's allowed characters (letters, digits, ``_ - . / : space``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from semlab.utils.redact import is_secret_key, redact_text

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250

_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-./: ]")


__all__ = ["is_secret_key", "scrub_value", "sanitize_params", "sanitize_tags", "metric_name",
           "numeric_metrics", "truncate", "safe_key"]


def scrub_value(value: str) -> str:
    """``value`` without credentials: URI user info and credential-named query values become ``***``."""
    return redact_text(value)


def truncate(value: str, limit: int) -> str:
    """``value`` if it fits in ``limit`` characters, else its head plus a visible truncation marker."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value) - limit} chars]"
    return value[: max(0, limit - len(marker))] + marker


def safe_key(key: str) -> str:
    """A key within MLflow's 250-character limit (long keys keep their head plus a short hash)."""
    if len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return key[: MAX_KEY - 11] + "~" + digest


def sanitize_mapping(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Stringify, drop credential keys, scrub URIs and truncate every value."""
    out: dict[str, str] = {}
    for key, value in values.items():
        key = str(key)
        if is_secret_key(key):
            continue
        out[safe_key(key)] = truncate(scrub_value("None" if value is None else str(value)), limit)
    return out


def sanitize_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Params for ``log_batch`` (value limit 6000 characters)."""
    return sanitize_mapping(values, MAX_PARAM_VALUE)


def sanitize_tags(values: Mapping[str, Any]) -> dict[str, str]:
    """Tags for ``set_tag`` / ``log_batch`` (value limit 8000 characters)."""
    return sanitize_mapping(values, MAX_TAG_VALUE)


def metric_name(key: str) -> str:
    """A valid MLflow metric name: characters outside ``[A-Za-z0-9_-./: ]`` become ``_``."""
    return safe_key(_BAD_METRIC_CHARS.sub("_", str(key)))


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are real numbers (bools, strings, tensors of >1 element skipped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if hasattr(value, "item"):  # torch / numpy scalars (multi-element arrays raise and are skipped)
            try:
                value = value.item()
            except (ValueError, RuntimeError):
                continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[metric_name(key)] = float(value)
    return out
