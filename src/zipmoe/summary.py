"""`inspect`: what a container holds, section by section, without decoding anything."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from zipmoe.codecs.bf16 import entropy_bits
from zipmoe.formats.constants import CLASS_DENSE, CLASS_EXPERT, HEADER_NBYTES
from zipmoe.formats.reader import Container
from zipmoe.quant.spec import SLICE_KINDS


@dataclass(frozen=True)
class Section:
    """One row of the size table."""

    name: str
    count: int
    source_bytes: int
    stored_bytes: int
    exponent_entropy: float | None = None  # bits per BF16 value

    @property
    def ratio(self) -> float | None:
        return self.stored_bytes / self.source_bytes if self.source_bytes else None

    @property
    def bound(self) -> float | None:
        """Order-0 entropy bound of the BF16 split: (8 + H_exponent) / 16."""
        return None if self.exponent_entropy is None else (8 + self.exponent_entropy) / 16

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "source_bytes": self.source_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": self.ratio,
            "exponent_entropy": self.exponent_entropy,
            "entropy_bound": self.bound,
        }


def summarize(container: Container, *, tensors: bool = False) -> dict[str, Any]:
    """A JSON-able description of a container: source, model, codecs and sizes per section."""
    m, h = container.manifest, container.header
    sections = []
    for cls, label in ((CLASS_EXPERT, "expert tensors"), (CLASS_DENSE, "dense tensors")):
        members = [t for t in m.tensors if t.tensor_class == cls]
        bf16 = [t for t in members if t.dtype == "BF16"]
        other = [t for t in members if t.dtype != "BF16"]
        if bf16:
            histogram = np.asarray(m.stats.get("classes", {}).get(cls, {}).get("exponent_histogram", []), np.int64)
            entropy = entropy_bits(histogram) if histogram.size == 256 else None
            sections.append(_section(f"{label} (BF16)", bf16, entropy))
        if other:
            sections.append(_section(f"{label} (other dtypes)", other, None))
    file_blobs = [f.blob for f in m.files] + [s.header for s in m.safetensors]
    file_blobs += [v for s in m.safetensors for kind, v in s.segments if kind == "gap"]
    sections.append(
        Section(
            "files, headers, small tensors",
            len(file_blobs),
            sum(b.size for b in file_blobs),
            sum(b.nbytes for b in file_blobs),
        )
    )
    slices = _slices(container, sections)
    stored = sum(s.stored_bytes for s in sections)
    sections.append(Section("manifest", 1, 0, h.manifest_nbytes))
    padding = h.file_nbytes - stored - h.manifest_nbytes - HEADER_NBYTES
    sections.append(Section("header and alignment padding", 1, 0, HEADER_NBYTES + padding))
    source_bytes = sum(s.nbytes for s in m.safetensors) + sum(f.blob.size for f in m.files)
    total = Section("total", len(m.tensors) + len(container.small_tensors), source_bytes, h.file_nbytes)
    encodings = sorted({container.encodings[t.encoding].label for t in m.tensors})
    doc: dict[str, Any] = {
        "path": str(container.path),
        "format_version": h.format_version,
        "created_by": m.created_by,
        "file_bytes": h.file_nbytes,
        "manifest_sha256": manifest_sha256(container),
        "source": m.source,
        "model": m.model,
        "encodings": [dict(c) for c in m.encodings],
        "encoding_labels": encodings,
        "n_tensors": len(m.tensors) + len(container.small_tensors),
        "n_expert_records": len(m.experts),
        "files": [{"name": f.name, "role": f.role, "bytes": f.blob.size} for f in m.files],
        "safetensors": [{"name": s.name, "bytes": s.nbytes, "sha256": s.sha256} for s in m.safetensors],
        "sections": [s.to_json() for s in sections] + [total.to_json()],
        "slices": slices,
    }
    if tensors:
        doc["tensors"] = [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "class": t.tensor_class,
                "layer": t.layer,
                "expert": t.expert,
                "fused": t.fused,
                "source_bytes": t.size,
                "stored_bytes": t.nbytes,
                "ratio": t.nbytes / t.size if t.size else None,
                "exponent_entropy": t.exponent_entropy,
                "encoding": container.encodings[t.encoding].label,
            }
            for t in m.tensors
        ] + [
            {
                "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "class": t.tensor_class, "layer": None,
                "expert": None, "fused": False, "source_bytes": t.size, "stored_bytes": None, "ratio": None,
                "exponent_entropy": None, "encoding": "raw run",
            }
            for t in container.small_tensors.values()
        ]  # fmt: skip
    return doc


def manifest_sha256(container: Container) -> str:
    """SHA-256 of the manifest bytes, which hold the SHA-256 of every source tensor and file: an equal digest and a
    passing `zipmoe verify` (which decodes and hashes every tensor) authenticate the container, XXH64 alone cannot."""
    h = container.header
    return hashlib.sha256(container.data[h.manifest_offset : h.manifest_offset + h.manifest_nbytes]).hexdigest()


def _slices(container: Container, sections: list[Section]) -> dict[str, Any] | None:
    """Add a section per slice kind (sizes against the BF16 experts); the slice configuration and per-expert sizes."""
    spec = container.slice_spec
    if spec is None:
        return None
    m = container.manifest
    expert_bf16 = sum(t.size for t in m.tensors if t.tensor_class == CLASS_EXPERT)
    out: dict[str, Any] = {**spec.get_config(), "label": spec.label}
    for kind in SLICE_KINDS:
        records = [r for r in m.slice_records if r.kind == kind]
        blobs = [blob for r in records for _, _, blob in r.members]
        sections.append(Section(f"{kind.upper()} slices ({spec.bits_per_weight(kind):g} bits/weight)", len(blobs),
                                expert_bf16, sum(b.nbytes for b in blobs)))  # fmt: skip
        out[kind] = {
            "bits_per_weight": spec.bits_per_weight(kind),
            "record_bytes": max((r.nbytes for r in records), default=0),
            "total_bytes": sum(r.nbytes for r in records),
        }
    return out


def _section(name: str, tensors: list, entropy: float | None) -> Section:
    return Section(name, len(tensors), sum(t.size for t in tensors), sum(t.nbytes for t in tensors), entropy)
