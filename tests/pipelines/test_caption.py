"""`run_caption` on real media with a tiny random BLIP, through a local Ray."""
from pathlib import Path

import numpy as np
import pytest

from cart_core.captioner import Captioner
from cart_core.media import content_hash, decode_image, decode_video_frames
from cart_core.store import Manifest, Store, StoreError, features_table
from pipelines.caption import run_caption
from tests.pipelines import media_fixtures as mf


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return mf.tiny_captioner(tmp_path_factory.mktemp("blip"))


def committed_features(store: Store, folder) -> dict[str, str]:
    """A features run as `cart extract` leaves it (plus an imported row and a vanished file)."""
    mf.write_media_corpus(folder, n_videos=2, n_images=2, n_audio=1, bad=False)
    items = {"vid-0": ("video", "clip0.mp4"), "vid-1": ("video", "clip1.mp4"), "img-0": ("image", "image0.png"),
             "img-1": ("image", "image1.jpg"), "aud-0": ("audio", "sound0.wav"),
             "imp-0": ("image", "items.parquet"), "gone": ("image", "deleted.png")}
    uris = {k: str(folder / name) for k, (_, name) in items.items()}
    hashes = [content_hash(Path(u).read_bytes()) if Path(u).exists() else None for u in uris.values()]
    table = features_table(list(items), np.eye(len(items), 8), [m for m, _ in items.values()], list(uris.values()),
                           hashes)
    store.write_table(table, "features/extract-x/part-00000.parquet")
    store.commit(Manifest(features=["features/extract-x"], dim=8), "features")
    return uris


def test_caption_writes_pseudo_queries_for_images_and_videos(ray_local, tmp_path, captioner):
    store = Store(tmp_path / "store")
    uris = committed_features(store, tmp_path / "media")
    cfg = mf.tiny_config(captioner=captioner)
    summary = run_caption(store, cfg)
    assert summary["counts"].items() >= {"items": 7, "captioned": 4, "skipped_audio": 1, "skipped_no_media": 1,
                                         "errors": 1}.items()
    m = store.manifest()
    assert (m.version, m.queries, m.errors) == (2, [f"queries/{summary['run']}"], [f"errors/{summary['run']}"])

    queries = store.read_table(m.queries).to_pylist()
    assert {q["source"] for q in queries} == {"pseudo"}
    texts: dict[str, set] = {}
    for q in queries:
        texts.setdefault(q["item_id"], set()).add(q["text"])
    assert set(texts) == {"vid-0", "vid-1", "img-0", "img-1"}

    model = Captioner(captioner, cfg.caption.max_new_tokens, "cpu")   # the same captions, computed here
    frames = decode_video_frames(Path(uris["vid-0"]).read_bytes(), cfg.caption.frames)
    assert texts["vid-0"] == set(model.caption(frames)) and len(texts["vid-0"]) <= cfg.caption.frames
    assert texts["img-1"] == set(model.caption([decode_image(Path(uris["img-1"]).read_bytes())]))

    error = store.read_table(m.errors).to_pylist()
    assert [(e["item_id"], e["stage"], e["reason"]) for e in error] == [("gone", "caption", "file not found")]

    again = run_caption(store, cfg)     # nothing new: every item captioned, the one error already recorded
    assert again["counts"].items() >= {"captioned": 0, "skipped_captioned": 4, "new_errors": 0}.items()
    assert store.manifest().version == 2


def test_caption_needs_features(tmp_path, captioner):
    with pytest.raises(StoreError, match="cart extract"):
        run_caption(Store(tmp_path / "empty"), mf.tiny_config(captioner=captioner))


def test_a_file_changed_since_extract_is_not_captioned(ray_local, tmp_path, captioner):
    """Its captions would describe other content than its features: an error row saying to
    `cart reindex --update` it, as `cart extract` says for the same file."""
    from pipelines.caption import CHANGED

    store = Store(tmp_path / "store")
    uris = committed_features(store, tmp_path / "media")
    mf.write_image(Path(uris["img-0"]), seed=7)  # replaced after extract
    summary = run_caption(store, mf.tiny_config(captioner=captioner))
    assert summary["counts"]["captioned"] == 3
    errors = {e["item_id"]: e["reason"] for e in store.read_table(store.manifest().errors).to_pylist()}
    assert errors == {"img-0": CHANGED, "gone": "file not found"}
    assert "img-0" not in set(store.read_table(store.manifest().queries).column("item_id").to_pylist())


def test_a_captioner_that_does_not_load_is_refused_before_ray_starts(tmp_path):
    from cart_core.errors import ConfigError

    store = Store(tmp_path / "store")
    committed_features(store, tmp_path / "media")
    with pytest.raises(ConfigError, match=r"caption.model: '.*nowhere' cannot be loaded \(no such folder\)"):
        run_caption(store, mf.tiny_config(captioner=str(tmp_path / "nowhere")))
    assert store.manifest().version == 1
