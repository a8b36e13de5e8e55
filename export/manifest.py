"""The export folder's manifest: what each file is, how to feed the model, and the sha256 of every file (DESIGN §5).

Torch-free (json and hashlib only), so the runtime reads and verifies exports on a box with numpy alone. The manifest
is written last and atomically (temporary file, then rename), so a folder whose export was interrupted has either no
manifest or the previous complete one, never a half-written one; :func:`load_manifest` refuses a folder whose files
do not match their recorded hashes (a tampered, truncated or swapped model) with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ManifestError",
    "file_hashes",
    "load_manifest",
    "sha256_file",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "attrimeter-export"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """An export folder that cannot be used: no or foreign manifest, a missing file, or a hash mismatch."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Args:
        path: The file.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(export_dir: str | Path) -> dict[str, str]:
    """The sha256 of every file under ``export_dir`` but the manifest, keyed by POSIX path relative to the folder.

    Args:
        export_dir: The export folder.

    Returns:
        ``{relative path: sha256}``, sorted by path.
    """
    root = Path(export_dir)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not path.name.startswith(".tmp-"):
            out[rel] = sha256_file(path)
    return out


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of the folder into ``manifest["files"]`` and write ``manifest.json`` atomically.

    Args:
        export_dir: The export folder, holding everything the manifest describes.
        manifest: The description (JSON-serialisable); ``format``, ``version`` and ``files`` are set here.

    Returns:
        The manifest as written.
    """
    root = Path(export_dir)
    body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest, "files": file_hashes(root)}
    path = root / MANIFEST_NAME
    tmp = root / f".tmp-{MANIFEST_NAME}"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return body


def load_manifest(export_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read an export folder's manifest and, by default, check every recorded file against its sha256.

    Args:
        export_dir: The export folder (written by ``attrimeter export``).
        verify: Check the hashes (reads every file once; pass False only for a quick look at the metadata).

    Returns:
        The manifest as a dict.

    Raises:
        ManifestError: If the folder or its manifest is missing or unreadable, the manifest is not an AttriMeter export
            of a known version, or a recorded file is missing or differs from its hash.
    """
    root = Path(export_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"export folder {root} does not exist (create it with `attrimeter export`)")
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: not an export folder, or its export did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not an AttriMeter export manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: unsupported manifest version {manifest.get('version')!r} "
                            f"(this AttriMeter reads version {MANIFEST_VERSION}; re-export)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{path} lists no files")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ManifestError(f"{path} lists {rel!r}, which lies outside the export folder")
    if verify:
        for rel, expected in files.items():
            file = root / rel
            if not file.is_file():
                raise ManifestError(f"{root}: {rel} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise ManifestError(
                    f"{root}: {rel} does not match its sha256 in the manifest (expected {expected[:12]}…, got "
                    f"{actual[:12]}…): the file changed after export; re-export rather than edit an export folder"
                )
    return manifest
