"""Discrete latent codes (DLC): the argmax vertex of each SEM simplex, exported as Parquet.

For an image x the SEM backbone gives L simplices ``s_l = softmax(z_l / tau)`` over V vertices;
its code is ``c_l = argmax_v z_l[v]`` (independent of tau > 0), so an image becomes L integers
in [0, V). The export is a Parquet table with columns ``index`` (int64, position in the
dataset), ``label`` (int64) and ``codes`` (fixed-size list<uint16>[L]); L, V, the checkpoint and
the dataset are in the schema metadata.

Code usage, per simplex l with empirical vertex frequencies p_l(v) over the N images:
``H_l = -sum_v p_l(v) log2 p_l(v)`` bits (at most log2 V) and ``used_l = #{v : p_l(v) > 0}``;
the summary gives mean / min / max of both over the L simplices and the number of distinct
code tuples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from semlab.utils.atomic import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

CODES_FILE = "codes.parquet"
SUMMARY_FILE = "code_usage.json"
HISTOGRAM_FILE = "code_usage.png"
MAX_V = 2**16  # codes are stored as uint16


# --------------------------------------------------------------------------- extraction
def make_dlc_transform(crop_size: int = 224) -> Any:
    """The reference extraction's image transform: CenterCrop(crop_size) of the image as it is (no
    resize to 256 first), ToTensor, ImageNet normalisation. Smaller images are zero-padded by
    CenterCrop, as in the reference."""
    from torchvision import transforms

    from semlab.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return transforms.Compose([
        transforms.CenterCrop(int(crop_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


@torch.no_grad()
def codes_of_batch(backbone: nn.Module, x: Tensor) -> Tensor:
    """(B, L) long codes: ``backbone.dlc(x)`` (argmax of each simplex of the raw SEM output), in
    float32 as the reference extracts them: with 256 nearly tied vertices, bf16 logits would flip
    argmaxes."""
    return backbone.dlc(x.float())


@torch.no_grad()
def extract_codes(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) uint16 and labels (N,) int64 of every batch ``(images, labels)``, in order."""
    if not getattr(backbone, "has_sem", False):
        raise ValueError("DLC export needs a SEM backbone (student.L > 0 and student.V); this one has no SEM")
    if backbone.sem_V > MAX_V:
        raise ValueError(f"V={backbone.sem_V} vertices do not fit the uint16 codes (V <= {MAX_V})")
    device = torch.device(device)
    backbone.eval().to(device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="DLC", unit="img", dynamic_ncols=True)
    codes, labels = [], []
    for x, y in batches:
        c = codes_of_batch(backbone, x.to(device, non_blocking=True))
        codes.append(c.to(torch.int32).cpu().numpy().astype(np.uint16))
        labels.append(np.asarray(y, dtype=np.int64).reshape(-1))
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if not codes:
        raise ValueError("the dataset is empty: no codes to extract")
    return np.concatenate(codes), np.concatenate(labels)


# --------------------------------------------------------------------------- Parquet
def write_codes_parquet(
    path: str | Path,
    codes: np.ndarray,
    labels: np.ndarray,
    V: int,
    indices: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the codes table atomically: ``index``, ``label``, ``codes`` (fixed_size_list<uint16>[L])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    codes = np.ascontiguousarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, L), got shape {codes.shape}")
    n, L = codes.shape
    if codes.size and int(codes.max()) >= V:
        raise ValueError(f"a code is >= V={V}: codes must lie in [0, V)")
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or indices.shape != (n,):
        raise ValueError(f"labels {labels.shape} and indices {indices.shape} must both be ({n},)")
    flat = pa.array(codes.astype(np.uint16).reshape(-1), type=pa.uint16())
    column = pa.FixedSizeListArray.from_arrays(flat, L)
    meta = {"semlab.dlc.L": str(L), "semlab.dlc.V": str(int(V))}
    meta.update({f"semlab.dlc.{k}": str(v) for k, v in (metadata or {}).items()})
    table = pa.table({"index": indices, "label": labels, "codes": column}).replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_codes_parquet(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """``(indices, labels, codes (N, L) uint16, metadata)`` of a :func:`write_codes_parquet` table."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"index", "label", "codes"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a DLC table: missing column(s) {sorted(missing)}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    L = int(meta.get("semlab.dlc.L", "0"))
    flat = table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    n = table.num_rows
    codes = flat.astype(np.uint16).reshape(n, L if L else (flat.size // max(n, 1)))
    return (table.column("index").to_numpy(), table.column("label").to_numpy(), codes,
            {k.removeprefix("semlab.dlc."): v for k, v in meta.items() if k.startswith("semlab.dlc.")})


# --------------------------------------------------------------------------- usage summary
def code_usage(codes: np.ndarray, V: int) -> dict[str, Any]:
    """Per-simplex entropy (bits) and used vertices, with mean/min/max (see the module docstring)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty (N, L) array, got shape {codes.shape}")
    n, L = codes.shape
    counts = np.zeros((L, V), dtype=np.int64)
    for l in range(L):  # noqa: E741 (l is the simplex index of the math)
        counts[l] = np.bincount(codes[:, l].astype(np.int64), minlength=V)[:V]
    p = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    used = (counts > 0).sum(axis=1)
    distinct = len({row.tobytes() for row in np.ascontiguousarray(codes)})
    return {
        "num_images": int(n),
        "L": int(L),
        "V": int(V),
        "max_entropy_bits": math.log2(V),
        "entropy_bits": {"mean": float(ent.mean()), "min": float(ent.min()), "max": float(ent.max())},
        "used_vertices": {"mean": float(used.mean()), "min": int(used.min()), "max": int(used.max())},
        "distinct_codes": int(distinct),
        "per_simplex_entropy_bits": [round(float(e), 6) for e in ent],
        "per_simplex_used_vertices": [int(u) for u in used],
    }


def format_usage(summary: dict[str, Any]) -> str:
    e, u = summary["entropy_bits"], summary["used_vertices"]
    return (
        f"DLC code usage over {summary['num_images']} images, "
        f"L={summary['L']} simplices of V={summary['V']}:\n"
        f"  entropy per simplex (bits, max {summary['max_entropy_bits']:.2f}): "
        f"mean {e['mean']:.3f}  min {e['min']:.3f}  max {e['max']:.3f}\n"
        f"  used vertices per simplex: mean {u['mean']:.1f}  min {u['min']}  max {u['max']}\n"
        f"  distinct code tuples: {summary['distinct_codes']}"
    )


def plot_usage(summary: dict[str, Any], path: str | Path) -> Path:
    """PNG histograms of the per-simplex entropy and used-vertex counts (matplotlib, Agg), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist(summary["per_simplex_entropy_bits"], bins=30, color="tab:blue")
    axes[0].axvline(summary["max_entropy_bits"], color="k", ls="--", lw=1, label="log2 V")
    axes[0].set_xlabel("entropy of a simplex's code (bits)")
    axes[0].set_ylabel("simplices")
    axes[0].legend()
    axes[1].hist(summary["per_simplex_used_vertices"], bins=min(30, summary["V"]), color="tab:orange")
    axes[1].set_xlabel(f"used vertices per simplex (of V={summary['V']})")
    fig.suptitle(f"DLC usage: {summary['num_images']} images, L={summary['L']}, V={summary['V']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- the whole export
def export_dlc(
    backbone: nn.Module,
    dataset: Any,
    output_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Codes of every image of ``dataset`` -> ``codes.parquet``, ``code_usage.json`` and
    ``code_usage.png`` in ``output_dir``; prints and returns the usage summary."""
    from torch.utils.data import DataLoader

    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    codes, labels = extract_codes(backbone, loader, device, progress=progress, total=len(dataset))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    V = int(backbone.sem_V)
    write_codes_parquet(out / CODES_FILE, codes, labels, V, metadata=metadata)
    summary = code_usage(codes, V)
    summary["files"] = {"codes": str(out / CODES_FILE), "histogram": str(out / HISTOGRAM_FILE)}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    plot_usage(summary, out / HISTOGRAM_FILE)
    print(format_usage(summary))
    return summary
