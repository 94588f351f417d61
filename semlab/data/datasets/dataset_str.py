"""Dataset strings (``Name:key=value:key=value``): names, keys and ``parse_dataset_str``.

Accepted strings (keys in any order; ``split`` values are case-insensitive):

- ``ImageNet:split=TRAIN|VAL|TEST:root=<dir>[:extra=<dir>]`` (``extra`` defaults to ``root``)
- ``ImageFolder:root=<dir>[:split=TRAIN|VAL[:val_fraction=0.1]]`` (with ``split``: a fixed held-out
  part of the folder, see :func:`semlab.data.datasets.image_folder.in_val_split`)
- ``Demo:split=TRAIN|VAL[:root=<cache dir>][:n_per_class=<n>]``
- ``Parquet:path=<dir or URI>[:split=TRAIN]`` (``semlab.data.datasets.parquet.ParquetDataset``)

A value may itself contain ``:`` (``path=s3://bucket/x``): a segment without ``=`` continues the
previous value.
"""

from __future__ import annotations

import difflib

from semlab.data.datasets.image_folder import DatasetError

DATASET_NAMES = ("ImageNet", "ImageFolder", "Demo", "Parquet")
# name -> (required keys, optional keys)
DATASET_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ImageNet": (("split", "root"), ("extra",)),
    "ImageFolder": (("root",), ("split", "val_fraction")),
    "Demo": (("split",), ("root", "n_per_class")),
    "Parquet": (("path",), ("split",)),
}


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_dataset_str(dataset_str: str) -> tuple[str, dict[str, str]]:
    """``"ImageNet:split=TRAIN:root=/d"`` -> ``("ImageNet", {"split": "TRAIN", "root": "/d"})``; the name and
    keys are checked (``DatasetError`` naming the problem and the accepted values)."""
    if not isinstance(dataset_str, str) or not dataset_str.strip():
        raise DatasetError(f"empty dataset string {dataset_str!r}; expected e.g. 'Demo:split=TRAIN'")
    name, *segments = dataset_str.strip().split(":")
    if name not in DATASET_KEYS:
        raise DatasetError(
            f"unknown dataset {name!r} in {dataset_str!r}; expected one of {', '.join(DATASET_NAMES)}"
            + _suggest(name, DATASET_NAMES)
        )
    required, optional = DATASET_KEYS[name]
    allowed = required + optional
    kwargs: dict[str, str] = {}
    last_key: str | None = None
    for segment in segments:
        if "=" not in segment:
            if last_key is None:
                raise DatasetError(f"malformed dataset string {dataset_str!r}: {segment!r} is not key=value")
            kwargs[last_key] += ":" + segment
            continue
        key, value = segment.split("=", 1)
        if key not in allowed:
            raise DatasetError(
                f"unknown key {key!r} for dataset {name} in {dataset_str!r}; expected keys: "
                f"{', '.join(allowed)}" + _suggest(key, allowed)
            )
        if key in kwargs:
            raise DatasetError(f"key {key!r} given twice in dataset string {dataset_str!r}")
        kwargs[key] = value
        last_key = key
    for key, value in kwargs.items():
        if not value:
            raise DatasetError(f"empty value for key {key!r} in dataset string {dataset_str!r}")
    missing = [k for k in required if k not in kwargs]
    if missing:
        example = ":".join([name] + [f"{k}=<{k}>" for k in required])
        raise DatasetError(
            f"dataset string {dataset_str!r} is missing {', '.join(missing)}; expected e.g. {example!r}"
        )
    return name, kwargs
