"""Remove credentials from text and config trees before they are written anywhere.

One rule for every place a config or URI leaves the process (``<out>/config.yaml``,
``eval/training_*/config.yaml``, MLflow params, tags and artifacts, ``mlflow_run.json``, log lines):

- a key that names a credential (``password``, ``passwd``, ``token``, ``secret``, ``api_key``,
  ``sig``, ``signature``...; whole words, so ``student.num_register_tokens`` is not one but
  ``hf_token`` is) keeps its key and loses its value (``***``);
- inside any text, the user info of a URI (``https://user:pw@host``) becomes ``***@`` and the
  value of a query parameter that names a credential (``?sig=...``, ``X-Amz-Signature=...``,
  ``token=...``) becomes ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

SECRET_KEY_RE = re.compile(
    r"(?:^|[^a-z])(password|passwd|pwd|token|secret|credentials?|api[_-]?key|access[_-]?key|"
    r"secret[_-]?key|private[_-]?key|auth[_-]?token|sas[_-]?token|signature|sig)(?:[^a-z]|$)",
    re.IGNORECASE,
)
"""A key naming a credential: whole words only (``num_register_tokens`` is not one, ``hf_token`` is)."""

_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^/@\s?#]+)@")
# name=value inside a query string (after ? or &, or ; as some signers use)
_QUERY_PAIR = re.compile(r"([?&;])([^=&#\s?;]+)=([^&#\s;]*)")


def is_secret_key(key: str) -> bool:
    """True when a (dotted) key names a credential."""
    return bool(SECRET_KEY_RE.search(str(key)))


def redact_text(text: str) -> str:
    """``text`` with URI user info and credential-named query values replaced by ``***``."""
    text = _URI_USERINFO.sub(rf"\1{REDACTED}@", text)

    def query(match: re.Match[str]) -> str:
        sep, key, value = match.groups()
        return f"{sep}{key}={REDACTED}" if is_secret_key(key) and value else match.group(0)

    return _QUERY_PAIR.sub(query, text)


def redact_tree(node: Any) -> Any:
    """A copy of a plain container tree (dicts, lists, scalars) with credentials redacted:
    values under credential-named keys become ``***``, every string goes through :func:`redact_text`."""
    if isinstance(node, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_tree(v))
                for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v) for v in node]
    if isinstance(node, str):
        return redact_text(node)
    return node
