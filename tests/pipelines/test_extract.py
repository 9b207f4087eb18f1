"""`run_extract` on real media written here, with tiny random CLIP / CLAP, through a local Ray:
local store and S3 (moto server) store."""
import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cart_core.media import sample_indices
from cart_core.store import Manifest, Store, StoreError
from pipelines.extract import read_media_table, run_extract
from tests.pipelines import media_fixtures as mf

GOOD = {"vid-0": "video", "vid-1": "video", "img-0": "image", "img-1": "image", "aud-0": "audio", "aud-1": "audio"}
BAD = {"bad-truncated": "not a decodable media file", "bad-noise": "not a decodable image",
       "bad-missing": "file not found", "bad-unsupported": "unsupported file type '.txt'"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"clip": mf.tiny_clip(folder / "clip"), "clap": mf.tiny_clap(folder / "clap")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return mf.write_media_corpus(tmp_path_factory.mktemp("media"), n_audio=2)


def reference_embedding(clip: str, path: str, frames: int | None) -> np.ndarray:
    """What the video / image embedding must be, computed here from PyAV / Pillow and CLIPModel."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    if frames is None:
        images = [Image.open(path).convert("RGB")]
    else:
        with av.open(path) as c:
            decoded = [f.to_image() for f in c.decode(video=0)]
        images = [decoded[i] for i in sample_indices(len(decoded), frames)]
    model, proc = CLIPModel.from_pretrained(clip).eval(), CLIPImageProcessor.from_pretrained(clip)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    feats = getattr(out, "pooler_output", out).numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    mean = feats.mean(0)
    return mean / np.linalg.norm(mean)


def test_bad_media_tables_name_file_row_and_reason(tmp_path, models):
    cfg = mf.tiny_config(models["clip"], models["clap"])
    store = Store(tmp_path / "store")
    cases = {"missing": (pa.table({"item_id": ["a"]}), "missing required column"),
             "empty": (pa.table({"item_id": pa.array([], pa.string()), "uri": pa.array([], pa.string())}), "empty"),
             "dup": (pa.table({"item_id": ["a", "b", "a"], "uri": ["x.png", "y.png", "z.png"]}),
                     r"row 2: duplicate item_id 'a' \(first at row 0\)"),
             "null": (pa.table({"item_id": ["a", None], "uri": ["x.png", "y.png"]}), "row 1: item_id is empty")}
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        with pytest.raises(ValueError, match=message) as info:
            run_extract(store, str(tmp_path / f"{name}.parquet"), cfg)
        assert f"{name}.parquet" in str(info.value)
    with pytest.raises(ValueError, match="not found"):
        read_media_table(str(tmp_path / "nope.parquet"))
    assert store.manifest().version == 0


def test_dims_are_checked_before_any_work(tmp_path, models, corpus):
    cfg = mf.tiny_config(models["clip"], mf.tiny_clap(tmp_path / "clap16", dim=16))
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError, match="32 dims but audio features .* have 16"):
        run_extract(store, str(corpus), cfg)
    store.commit(Manifest(dim=64), "a 64-dim store")
    with pytest.raises(StoreError, match="holds 64-dim features"):
        run_extract(store, str(corpus), mf.tiny_config(models["clip"], models["clap"]))
    assert store.manifest().version == 1 and not store.listdir("features")


def test_extract_writes_features_errors_manifest_and_rerun_skips(ray_local, tmp_path, models, corpus):
    cfg = mf.tiny_config(models["clip"], models["clap"], frames=4)
    store = Store(tmp_path / "store")
    summary = run_extract(store, str(corpus), cfg)
    run = summary["run"]
    assert summary["counts"].items() >= {"items": 10, "extracted": 6, "errors": 4, "skipped": 0,
                                     "video": 2, "image": 2, "audio": 2}.items()
    assert summary["items_per_s"] > 0 and summary["dim"] == mf.DIM

    m = store.manifest()
    assert (m.version, m.features, m.errors, m.dim) == (1, [f"features/{run}"], [f"errors/{run}"], mf.DIM)
    assert json.loads((tmp_path / "store" / "jobs" / f"{run}.json").read_text())["counts"]["extracted"] == 6

    feats = store.read_table(m.features)
    assert feats.schema.field("embedding").type == pa.list_(pa.float32(), mf.DIM)
    rows = {r["item_id"]: r for r in feats.to_pylist()}
    assert {k: r["modality"] for k, r in rows.items()} == GOOD
    emb = np.array([r["embedding"] for r in rows.values()], np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    for r in rows.values():
        assert r["content_hash"] == hashlib.sha256(Path(r["uri"]).read_bytes()).hexdigest()
    for item in ("vid-0", "vid-1", "img-0", "img-1"):
        frames = cfg.extract.frames if item.startswith("vid") else None
        expected = reference_embedding(models["clip"], rows[item]["uri"], frames)
        np.testing.assert_allclose(rows[item]["embedding"], expected, atol=1e-5, err_msg=item)
    assert not np.allclose(rows["vid-0"]["embedding"], rows["vid-1"]["embedding"])
    assert not np.allclose(rows["aud-0"]["embedding"], rows["aud-1"]["embedding"])

    errors = {r["item_id"]: r for r in store.read_table(m.errors).to_pylist()}
    assert set(errors) == set(BAD)
    for item, reason in BAD.items():
        assert reason in errors[item]["reason"] and errors[item]["stage"] == "extract" and errors[item]["uri"]

    again = run_extract(store, str(corpus), cfg)
    assert again["counts"].items() >= {"items": 10, "extracted": 0, "skipped": 6, "errors": 4, "new_errors": 0}.items()
    assert store.manifest().version == 1 and again["version"] == 1


def test_extract_from_and_into_s3(s3_server, ray_local, tmp_path, models):
    import fsspec

    mf.upload_folder(mf.write_media_corpus(tmp_path / "media", n_videos=1, n_images=1, n_audio=1,
                                           relative=True).parent, "s3://cart-test/media")
    store = Store("s3://cart-test/store")
    summary = run_extract(store, "s3://cart-test/media/media.parquet", mf.tiny_config(models["clip"], models["clap"]))
    assert summary["counts"].items() >= {"items": 7, "extracted": 3, "errors": 4}.items()
    m = Store("s3://cart-test/store").manifest()
    assert m.version == 1 and m.dim == mf.DIM
    feats = store.read_table(m.features)
    assert sorted(feats.column("item_id").to_pylist()) == ["aud-0", "img-0", "vid-0"]
    assert all(u.startswith("s3://cart-test/media/") for u in feats.column("uri").to_pylist())
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"cart-test/store/jobs/{summary['run']}.json")
    assert {r["reason"] for r in store.read_table(m.errors).to_pylist() if r["item_id"] == "bad-missing"} \
        == {"file not found"}

    # incremental: one new image, one image whose bytes changed (refused: that is `cart reindex --update`)
    folder = tmp_path / "media2"
    folder.mkdir()
    mf.write_image(folder / "new.png", seed=7)
    mf.write_image(folder / "image0.png", seed=5)
    table = pq.read_table(tmp_path / "media" / "media.parquet").to_pylist() + [
        {"item_id": "img-new", "uri": "new.png", "modality": None}]
    pq.write_table(pa.Table.from_pylist(table), folder / "media.parquet")
    mf.upload_folder(folder, "s3://cart-test/media")
    again = run_extract(store, "s3://cart-test/media/media.parquet", mf.tiny_config(models["clip"], models["clap"]))
    assert again["counts"].items() >= {"items": 8, "extracted": 1, "skipped": 2, "errors": 5, "new_errors": 1}.items()
    m2 = store.manifest()
    assert m2.version == 2 and m2.features == m.features + [f"features/{again['run']}"]
    changed = store.read_table(m2.errors[-1]).to_pylist()
    assert [(r["item_id"], "cart reindex --update" in r["reason"]) for r in changed] == [("img-0", True)]


def test_an_embedding_that_is_not_finite_becomes_an_error_row_not_a_feature():
    """Whatever the model gives back (a NaN from the media or the model, or nothing at all), only a
    finite, non-zero vector is committed; `cart quantize` would otherwise fail later naming no item."""
    from pipelines.extract import ExtractStage

    vectors = {0: [0.6, 0.8], 1: [np.nan, 1.0], 2: [np.inf, 0.0], 3: [0.0, 0.0]}
    out = [{"status": "ok", "reason": None} for _ in vectors]
    ExtractStage._embed(list(vectors), lambda idx: [vectors[i] for i in idx], out)
    assert out[0]["embedding"] == pytest.approx([0.6, 0.8]) and out[0]["status"] == "ok"
    assert [o["status"] for o in out[1:]] == ["error"] * 3
    assert "not finite" in out[1]["reason"] and "not finite" in out[2]["reason"] and "all zeros" in out[3]["reason"]
    assert all("embedding" not in o for o in out[1:])


def test_a_wrong_model_or_sample_rate_is_refused_before_ray_starts_naming_the_key(tmp_path, models, corpus):
    """Found in the driver from the model configs, with exit 2, not in every actor after Ray
    started (an `ActorDiedError`, exit 1, naming no key)."""
    from dataclasses import replace

    from cart_core.errors import ConfigError

    cfg = mf.tiny_config(models["clip"], models["clap"])
    store = Store(tmp_path / "store")
    wrong = [(replace(cfg, extract=replace(cfg.extract, sample_rate=16000)), r"extract.sample_rate=16000 .* expects"),
             (replace(cfg, extract=replace(cfg.extract, image_model=str(tmp_path / "nowhere"))),
              r"extract.image_model: '.*nowhere' cannot be loaded"),
             (replace(cfg, extract=replace(cfg.extract, audio_model=str(tmp_path / "nowhere"))),
              r"extract.audio_model: '.*nowhere' cannot be loaded")]
    for bad, message in wrong:
        with pytest.raises(ConfigError, match=message):
            run_extract(store, str(corpus), bad)
    assert store.manifest().version == 0
