"""From a folder of media files to ranked answers, as the README walks a new user through it:
scan -> extract (tiny CLIP) -> caption (tiny BLIP pseudo-queries) -> quantize -> train -> retrieve."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.config import load_config
from cart_core.store import Store
from pipelines.data_paths import REPO_ROOT
from tests.pipelines import media_fixtures as mf


@pytest.mark.slow  # the whole chain from media files (~45 s; each stage has its own tests): `make test-slow`
def test_media_folder_to_answers(tmp_path, ray_local):
    from pipelines.caption import run_caption
    from pipelines.extract import run_extract
    from pipelines.quantize import run_quantize
    from pipelines.retrieve import run_retrieve
    from pipelines.scan import scan_media
    from pipelines.train import run_train

    media = tmp_path / "media"
    mf.write_media_corpus(media, n_videos=4, n_images=8, n_audio=0, bad=False)
    (media / "notes.txt").write_text("not media")
    counts = scan_media(str(media), str(tmp_path / "media.parquet"))
    assert counts == {"files": 12, "image": 8, "video": 4, "audio": 0, "skipped": 2}  # notes.txt, media.parquet

    tiny = mf.tiny_config(clip=mf.tiny_clip(tmp_path / "clip"), captioner=mf.tiny_captioner(tmp_path / "blip"))
    cfg = load_config(REPO_ROOT / "configs" / "small.yaml", [
        "identifiers.n_clusters=3", "identifiers.rqvae.codebook_size=4", "train.epochs=2",
        f"extract.image_model={tiny.extract.image_model}", f"caption.model={tiny.caption.model}",
        "caption.frames=2", "caption.max_new_tokens=6", "extract.batch_size=8"])
    store = Store(tmp_path / "store")
    assert run_extract(store, str(tmp_path / "media.parquet"), cfg)["counts"]["extracted"] == 12
    assert run_caption(store, cfg)["counts"]["queries"] >= 12
    run_quantize(store, cfg)
    run_train(store, cfg)

    queries = store.read_table(store.manifest().queries).slice(0, 6)
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(6)], "text": queries["text"]}),
                   tmp_path / "q.parquet")
    run_retrieve(store, str(tmp_path / "q.parquet"), str(tmp_path / "out.parquet"), cfg, k=3)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == 18
    assert set(out.column("item_id").to_pylist()) <= set(pq.read_table(tmp_path / "media.parquet")["item_id"].to_pylist())
