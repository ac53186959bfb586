"""Stage files: how a stage writes, marks, reads and fingerprints its outputs (one place for each).

    write_atomic / write_json / write_jsonl   a temporary file renamed over the target: a killed run
                                              never leaves a half file
    write_folder                              the same for a folder built by a function
    is_done / mark_done                       the done-marker: a ``<name>.key`` sidecar holding the
                                              stage key the output was computed for
    read_jsonl                                JSON lines, a corrupt line named by file and line number
    file_bytes_digest                         sha256 of a file's bytes (16 hex)
    value_checksums_digest                    sha256 of the checksums a value model folder records in
                                              its value.json (16 hex): what a key depends on
    output_digest                             a stage output's digest: a file's bytes, a value folder's
                                              recorded checksums
    tree_digest                               sha256 over the relative paths and bytes of every file
                                              of a folder (64 hex): what the registry pins
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> Path:
    return write_atomic(path, json.dumps(data, indent=indent))


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    return write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_folder(out: str | os.PathLike, build) -> Path:
    """``build(folder)`` fills a temporary folder, which then replaces ``out`` (never half a folder)."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _sidecar(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".key")


def is_done(out: str | os.PathLike, key: str) -> bool:
    """Whether ``out`` exists and was computed for ``key``."""
    sidecar = _sidecar(out)
    return Path(out).exists() and sidecar.exists() and sidecar.read_text() == key


def mark_done(out: str | os.PathLike, key: str) -> None:
    _sidecar(out).write_text(key)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: corrupt line ({err.msg}); delete the file to recompute it") from None
    return rows


def file_bytes_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def value_checksums_digest(folder: str | os.PathLike) -> str:
    meta = json.loads((Path(folder) / "value.json").read_text())
    return hashlib.sha256(json.dumps(meta["checksums"], sort_keys=True).encode()).hexdigest()[:16]


def output_digest(path: str | os.PathLike) -> str:
    """A stage output's digest: a value model folder by its recorded checksums, a file by its bytes."""
    path = Path(path)
    return value_checksums_digest(path) if path.is_dir() else file_bytes_digest(path)


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths and bytes of every file in ``folder`` (order-independent)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
