"""`cart scan`: a folder of media files (local or s3://) -> the media table `cart extract` reads.

item_id is the path relative to the folder (stable, unique, human-readable); uri is the full
path; modality comes from the extension. Files with other extensions are listed as skipped.
"""
from __future__ import annotations

import fsspec
import pyarrow as pa

from cart_core.errors import BadInput, InputNotFound
from cart_core.media import infer_modality
from pipelines.outputs import check_output_file, write_tables
from pipelines.runtime import log


def scan_media(folder: str, out: str) -> dict:
    check_output_file(out, (folder,))  # before a listing that may take minutes on S3
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isdir(root):
        raise InputNotFound(f"{folder}: not a folder")
    scheme = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    root = root.rstrip("/")
    rows, skipped = [], []
    for path in sorted(fs.find(root)):
        modality = infer_modality(path)
        rel = path[len(root) + 1:]
        if rel.startswith(".") or "/." in rel:
            continue
        if modality is None:
            skipped.append(rel)
            continue
        rows.append((rel, f"{scheme}{path}", modality))
    if not rows:
        raise BadInput(f"{folder}: no image, video or audio files found ({len(skipped)} other files)")
    table = pa.table({"item_id": [r[0] for r in rows], "uri": [r[1] for r in rows],
                      "modality": [r[2] for r in rows]})
    write_tables([table], out, table.schema, job="scan")  # whole or absent
    counts = {m: sum(r[2] == m for r in rows) for m in ("image", "video", "audio")}
    log("scan", f"{len(rows)} media files -> {out} ({counts}); {len(skipped)} other files skipped")
    return {"files": len(rows), **counts, "skipped": len(skipped)}
