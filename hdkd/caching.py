"""Fingerprinted caches on disk: Arrow tables, safetensors and JSON, written atomically and verified on load.

Each cache entry is a folder named by the fingerprint of its inputs. It is built in a temporary folder and
renamed into place, so a reader never sees half an entry. ``manifest.json`` records the fingerprint and the
SHA-256 of every file; an entry whose files do not match is reported and rebuilt. A per-entry lock file
keeps two processes from building the same entry at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def fingerprint(value: Any) -> str:
    """Return a short SHA-256 digest of a JSON-serialisable value (key order does not matter)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock for building the cache entry ``folder`` (a sibling ``.lock`` file)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def verify(folder: Path, key: str, report: bool = True) -> bool:
    """Return True when ``folder`` contains a complete entry for ``key`` whose files match their checksums.

    A damaged entry is logged in one warning line unless ``report`` is False (a second check of the same entry).
    """
    if not folder.exists():
        return False
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("fingerprint") != key:
            raise ValueError(f"fingerprint {manifest.get('fingerprint')!r} != {key!r}")
        for name, digest in manifest["files"].items():
            if file_sha256(folder / name) != digest:
                raise ValueError(f"checksum mismatch in {name}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        if report:
            logger.warning("cache entry %s is damaged (%s); rebuilding it", folder, err)
        return False
    return True


def write_entry(folder: Path, key: str, write_files: Callable[[Path], None], meta: dict | None = None) -> None:
    """Build an entry in a temporary folder with ``write_files(tmp)``, add the manifest, and rename it into place.

    Call it under ``locked(folder)``: temporary folders of the same entry left by a killed process are removed.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_files(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"fingerprint": key, "files": files, "meta": meta or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("meta", {})


# --- Arrow ----------------------------------------------------------------------------------------------


def load_arrow(folder: Path, key: str):
    """Return the cached datasets.Dataset for ``key``, or None when absent or damaged."""
    import datasets

    # Under the lock, so the entry is not replaced between the check and the read.
    with locked(folder):
        if not verify(folder, key):
            return None
        return datasets.Dataset.from_file(str(folder / "data.arrow"))


def save_arrow(folder: Path, key: str, columns: dict[str, list]):
    """Write ``columns`` as an Arrow file entry and return it loaded as a datasets.Dataset."""
    import datasets

    def write(tmp: Path):
        from datasets.arrow_writer import ArrowWriter

        table = datasets.Dataset.from_dict(columns).data.table
        with ArrowWriter(path=str(tmp / "data.arrow")) as writer:
            writer.write_table(table)
            writer.finalize()

    with locked(folder):
        # Another process may have written the entry since load_arrow; a damaged one was reported there.
        if not verify(folder, key, report=False):
            write_entry(folder, key, write)
        return datasets.Dataset.from_file(str(folder / "data.arrow"))


# --- JSON -----------------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers see the old or the new file only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
