"""Which data a benchmark run read: a signature of a data folder's image files, so that prepared
data and resume markers are never shared between folders whose labels agree but whose images do not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def image_signature(data: Path) -> str:
    """SHA-256 over the image files of ``data``'s train/ and test/ (relative path, size, mtime), not
    their bytes: two folders with the same labels but other images (a shortcut phantom next to the
    ordinary one) must not share the benchmark's prepared metadata and caches. One ``stat`` per file
    (seconds for the phantom; a minute or so for RSPECT's 1.8 M files on a local disk)."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        root = Path(data) / split
        if not root.is_dir():
            continue
        rows = []
        for dirpath, _, names in os.walk(root, followlinks=True):
            for n in names:
                f = Path(dirpath) / n
                st = f.stat()
                rows.append(f"{f.relative_to(data)}\t{st.st_size}\t{st.st_mtime_ns}")
        h.update("\n".join(sorted(rows)).encode())
    return h.hexdigest()[:16]
