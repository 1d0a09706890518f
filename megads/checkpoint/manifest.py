"""A checkpoint's manifest: every file with its size and SHA-256, written before `COMPLETE`.

`verify(dir)` checks a checkpoint against it and names the first file that is missing, truncated,
grown or altered; `megads checkpoint verify DIR` is the same check from the command line. Hashing
is split over the ranks that wrote the checkpoint (`hash_files` on a slice of the list each).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megads.errors import CheckpointError

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
_UNLISTED = {MANIFEST, COMPLETE}


class ManifestMissing(CheckpointError):
    """A complete checkpoint without a manifest: written by megads before manifests existed."""


def list_files(root: Path) -> list[str]:
    """Every regular file under root (relative POSIX paths, sorted), manifest and marker excluded."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if rel not in _UNLISTED:
                out.append(rel)
    return sorted(out)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (root / n).stat().st_size, "sha256": sha256(root / n)} for n in names}


def write_manifest(root: Path, files: dict[str, dict], meta: dict) -> None:
    body = {"format": "megads-checkpoint-manifest/1", **meta, "files": dict(sorted(files.items()))}
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    try:
        body = json.loads(p.read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
    except FileNotFoundError:
        raise ManifestMissing(f"{p}: missing (the checkpoint was not completed, or predates manifests)") from None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable ({type(e).__name__}: {e})") from None
    return body


def verify(root: str | os.PathLike, checksums: bool = True) -> dict:
    """Check every listed file's presence, size and (with checksums) SHA-256; return the manifest.
    Raises CheckpointError naming the first bad file."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    if not (root / COMPLETE).is_file():
        raise CheckpointError(f"{root}: incomplete checkpoint (no {COMPLETE} marker)")
    body = read_manifest(root)
    for name, want in body["files"].items():
        p = root / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "larger than written"
            raise CheckpointError(f"{p}: {what} ({size} bytes, the manifest says {want['size']})")
        if checksums and sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: damaged (SHA-256 differs from the manifest)")
    return body
