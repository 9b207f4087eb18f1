"""Incremental re-indexing on a real local Ray: add, delete, update, idempotence, crash + rerun."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cart_core.corpus import synthetic_corpus, write_corpus
from cart_core.index_version import referenced_paths
from cart_core.store import Store
from tests.pipelines.test_jobs import copy_of, small_config

N_OLD, N_NEW = 130, 30


def subset(src, dest, item_ids, caption_indices=None):
    dest.mkdir(parents=True, exist_ok=True)
    items = pq.read_table(src / "items.parquet")
    items = items.filter(pc.is_in(items["item_id"], pa.array(item_ids)))
    caps = pq.read_table(src / "captions.parquet")
    caps = caps.filter(pc.is_in(caps["item_id"], pa.array(item_ids)))
    if caption_indices is not None:
        caps = caps.filter(pc.is_in(caps["caption_index"], pa.array(caption_indices, pa.int16())))
    pq.write_table(items, dest / "items.parquet")
    pq.write_table(caps, dest / "captions.parquet")
    return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """A trained index over the first N_OLD items; the other N_NEW wait to be added."""
    from pipelines.importer import run_import
    from pipelines.quantize import run_quantize
    from pipelines.train import run_train

    root = tmp_path_factory.mktemp("reindex")
    write_corpus(synthetic_corpus(n_items=N_OLD + N_NEW, dim=32, n_captions=5, seed=7), root / "all")
    ids = pq.read_table(root / "all" / "items.parquet").column("item_id").to_pylist()
    old, new = subset(root / "all", root / "old", ids[:N_OLD]), subset(root / "all", root / "new", ids[N_OLD:],
                                                                       [0, 1, 2, 3])
    store = Store(root / "store")
    run_import(store, str(old / "items.parquet"), str(old / "captions.parquet"), holdout_caption_index=4)
    run_quantize(store, small_config())
    run_train(store, small_config())
    caps = pq.read_table(root / "all" / "captions.parquet")
    caps = caps.filter(pc.equal(caps["caption_index"], 4))
    pq.write_table(pa.table({"query_id": caps["item_id"], "text": caps["caption"]}), root / "queries.parquet")
    return {"root": root, "store": store, "old_ids": ids[:N_OLD], "new_ids": ids[N_OLD:], "new": new}


def fresh(base, tmp_path) -> Store:
    return copy_of(base["store"], tmp_path)


def untaught(store, manifest) -> set[str]:
    """Pending items no fine-tune has taught the generator yet."""
    from cart_core.index_version import IndexVersion

    return set(IndexVersion(store, manifest).untrained_pending())


def results(store, base, tmp_path, k=10) -> dict[str, list[str]]:
    from pipelines.retrieve import run_retrieve

    out = tmp_path / f"res-{store.manifest().version}.parquet"
    run_retrieve(store, str(base["root"] / "queries.parquet"), str(out), small_config(), k=k)
    df = pq.read_table(out).to_pandas()
    return df.groupby("query_id")["item_id"].apply(list).to_dict()


def test_add_keeps_old_identifiers_and_new_items_are_found(base, tmp_path, monkeypatch):
    import pipelines.reindex
    from cart_core.index_version import load_ids
    from pipelines.reindex import run_reindex

    def never(*_args, **_kwargs):
        raise AssertionError("a verified index never consults the fallback's gate: nothing to calibrate")

    monkeypatch.setattr(pipelines.reindex, "impostor_queries", never)
    store = fresh(base, tmp_path)
    before, _ = load_ids(store, store.manifest())
    v0 = store.manifest().version
    summary = run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"),
                          captions=str(base["new"] / "captions.parquet"), finetune=False)
    assert summary["counts"]["added"] == N_NEW and summary["drift"]["items"] == N_NEW
    manifest = store.manifest()
    assert manifest.version == v0 + 1 and untaught(store, manifest) == set(base["new_ids"])
    # a verified index ranks pending items itself: the fallback's gate is never calibrated
    assert manifest.extra["pending_threshold"] is None
    after, _ = load_ids(store, manifest)
    np.testing.assert_array_equal(after.codes[:N_OLD], before.codes)  # old identifiers never change
    assert list(after.item_ids[N_OLD:]) == sorted(base["new_ids"]) or set(after.item_ids[N_OLD:]) == set(base["new_ids"])
    assert len({tuple(c) for c in after.codes}) == len(after.codes)
    found = results(store, base, tmp_path)
    hit_added = np.mean([q in found[q] for q in base["new_ids"]])
    assert hit_added >= 0.5, hit_added  # findable before any fine-tune (the verifier; the store has one)

    again = run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"), finetune=True)  # duplicate add
    assert again["counts"]["duplicate_adds"] == N_NEW and again["counts"]["added"] == 0
    tuned = store.manifest()  # ... but the pending fine-tune is finished by this run
    assert tuned.version == v0 + 2 and not untaught(store, tuned) and tuned.generator != manifest.generator
    assert tuned.extra["pending"] == manifest.extra["pending"]  # reindex.keep_fallback: the fallback stays
    found = results(store, base, tmp_path)
    assert np.mean([q in found[q] for q in base["new_ids"]]) >= 0.3
    untouched = run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"), finetune=True)
    assert store.manifest().version == tuned.version and untouched["counts"]["added"] == 0
    # a delete-only reindex drops the deleted item from the pending table, and items the
    # fine-tune has taught stay decodable by the generator
    from cart_core.index_version import IndexVersion
    from pipelines.search import pending_fallback

    (tmp_path / "gone.txt").write_text(base["new_ids"][0])
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    after_delete = store.manifest()
    assert after_delete.extra["pending_threshold"] is None and not untaught(store, after_delete)
    assert base["new_ids"][0] not in IndexVersion(store, after_delete).pending().column("item_id").to_pylist()
    _, untrained = pending_fallback(IndexVersion(store, after_delete))
    assert len(untrained) == 0
    from pipelines.train import run_train

    run_train(store, small_config())  # a full training learns every item: the fallback is retired
    assert store.manifest().extra["pending"] is None


def test_deleted_items_are_never_returned(base, tmp_path):
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_compact

    store = fresh(base, tmp_path)
    gone = base["old_ids"][:15]
    (tmp_path / "delete.txt").write_text("\n".join(gone) + "\nnot-an-item\n")
    summary = run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))
    assert summary["counts"]["deleted"] == 15 and summary["counts"]["not_in_index"] == 1
    assert summary["counts"]["already_deleted"] == 0
    version = store.manifest().version
    found = results(store, base, tmp_path, k=20)
    returned = {item for items in found.values() for item in items}
    assert not returned & set(gone)
    run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))
    assert store.manifest().version == version  # the same delete twice changes nothing
    counts = run_compact(store, keep=2)
    assert counts["rows_dropped"] == 15
    feats = store.read_table(store.manifest().features)
    assert not set(feats.column("item_id").to_pylist()) & set(gone)
    assert {item for items in results(store, base, tmp_path, k=20).values() for item in items}.isdisjoint(gone)


def test_a_rollback_forward_past_a_delete_withdraws_the_item_from_the_version_that_answers(base, tmp_path):
    """While the newest version has no generator, an older one answers; when that older one still
    holds an item the newest deleted (rollback to before the delete, then forward again to a refit
    without it), the item is withdrawn from its answers: in process and in the Ray actors."""
    from cart_core.index_version import IndexVersion, is_servable
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_rollback
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    trained = store.manifest().version
    gone = base["old_ids"][:3]
    (tmp_path / "delete.txt").write_text("\n".join(gone) + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))
    run_quantize(store, small_config(), refit=True)  # identifiers without them, no generator yet
    refit = store.manifest().version
    assert IndexVersion.newest_servable(store).withdrawn == frozenset()  # the delete's own version answers
    run_rollback(store, trained)  # they are back, by design
    assert IndexVersion.newest_servable(store).withdrawn == frozenset()
    run_rollback(store, refit)  # the newest has no generator: the rollback of `trained` answers
    assert not is_servable(store.manifest())
    served = IndexVersion.newest_servable(store)
    assert served.version == refit + 1 and served.withdrawn == frozenset(gone)
    table, _ = served.ids()
    assert not table.live[np.isin(table.item_ids, gone)].any()
    assert int(table.live.sum()) == N_OLD - len(gone)
    retriever, table = load_retriever(served)
    caps = pq.read_table(base["root"] / "all" / "captions.parquet").to_pandas()
    rows, _ = retriever.search_batch(caps[caps.item_id.isin(gone)].caption.tolist(), k=20, beam_size=20)
    assert not {str(table.item_ids[r]) for r in rows.reshape(-1) if r >= 0} & set(gone)
    assert {i for items in results(store, base, tmp_path, k=20).values() for i in items}.isdisjoint(gone)


@pytest.mark.slow  # long fault / race test: `make test-slow` (keeps `make test` under 20 min on 2 cores)
def test_a_takedown_waits_for_neither_quantize_nor_training_which_commit_over_it(base, tmp_path, monkeypatch,
                                                                                   capsys):
    """A delete that lands while `cart quantize --refit` fits is committed dead in its table; while
    the refit waits for `cart train`, a delete commits at once (the older version answers without
    the items), adds are refused with the reason; a training that crashed resumes across a second
    delete, and commits over a third that lands as it finishes: every delete stays in force."""
    from cart_core.index_version import IndexVersion, is_servable, load_ids
    from cart_core.store import StoreError
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex
    from cart_core.hybrid import holdout_mask
    from pipelines.train import PENDING, held_out, resumed_from, run_train, training_pairs

    store = fresh(base, tmp_path)
    during, first, second, third = (base["old_ids"][i:i + 2] for i in (0, 2, 4, 6))
    for name, items in (("during", during), ("first", first), ("second", second), ("third", third)):
        (tmp_path / f"{name}.txt").write_text("\n".join(items) + "\n")
    run_quantize(store, small_config(), refit=True,  # new identifiers, no generator for them yet
                 before_commit=lambda: run_reindex(store, small_config(), delete=str(tmp_path / "during.txt")))
    assert store.manifest().message.startswith("quantize")
    table, _ = load_ids(store, store.manifest())
    assert not table.live[np.isin(table.item_ids, during)].any() and int(table.live.sum()) == N_OLD - 2
    assert IndexVersion.newest_servable(store).withdrawn == frozenset()  # the delete's own version answers
    summary = run_reindex(store, small_config(), delete=str(tmp_path / "first.txt"))
    assert summary["counts"]["deleted"] == 2 and not is_servable(store.manifest())
    assert IndexVersion.newest_servable(store).withdrawn == frozenset(first)
    from pipelines.cli import main
    capsys.readouterr()
    assert main(["versions", "--store", store.url]) == 0
    answering = capsys.readouterr().out.strip().splitlines()[-1]
    assert answering.startswith(f"answering: v{IndexVersion.newest_servable(store).version} (v{store.manifest().version}"
                                " has no generator") and "2 items deleted since are withdrawn" in answering, answering
    assert {i for items in results(store, base, tmp_path, k=20).values() for i in items}.isdisjoint(during + first)
    with pytest.raises(StoreError, match=r"--add must wait for `cart train`"):
        run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"))
    monkeypatch.setenv("CART_CRASH_AFTER_EPOCH", "1")
    with pytest.raises(Exception, match="injected crash after epoch 1"):
        run_train(store, small_config("jobs.train_max_failures=0"))
    monkeypatch.delenv("CART_CRASH_AFTER_EPOCH")
    unfinished, started = store.read_json(PENDING)["run"], store.read_json(PENDING)["started"]
    pending_ids = store.read_json(PENDING)["ids"]
    run_reindex(store, small_config(), delete=str(tmp_path / "second.txt"))
    read_between = store.manifest()
    (tmp_path / "racing.txt").write_text("\n".join(base["old_ids"][8:10]) + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "racing.txt"))
    # a resume that read the store before the last delete still goes on from its run
    assert resumed_from(store, pending_ids, read_between).version == started
    # the resumed run keeps the fusion slice it started with: its checkpoints learned none of it
    at_start, _ = training_pairs(store, small_config(), version=IndexVersion(store, store.version(started)))
    now, info = training_pairs(store, small_config())
    keys = lambda t: list(zip(t.column("row").to_pylist(), t.column("text").to_pylist()))  # noqa: E731
    cfg = small_config()
    held_first = {k for k, m in zip(keys(at_start), holdout_mask(at_start.num_rows, cfg.verify.holdout,
                                                                  cfg.train.seed)) if m}
    kept = held_out(store, cfg, now, started, info["base"].version)
    assert {k for k, m in zip(keys(now), kept) if m} == held_first & set(keys(now))
    assert not np.array_equal(kept, holdout_mask(now.num_rows, cfg.verify.holdout, cfg.train.seed))
    deleted_at = []

    def takedown():  # lands while the resumed training is about to commit
        run_reindex(store, small_config(), delete=str(tmp_path / "third.txt"))
        deleted_at.append(store.manifest().version)

    summary = run_train(store, small_config(), resume=True, before_commit=takedown)
    assert summary["run"] == unfinished  # resumed across the second delete, not started afresh
    done = store.manifest()
    assert is_servable(done) and done.message.startswith("train") and done.version == deleted_at[0] + 1
    gone = during + first + second + third + base["old_ids"][8:10]
    table, _ = load_ids(store, done)
    assert not table.live[np.isin(table.item_ids, gone)].any()
    assert int(table.live.sum()) == N_OLD - len(gone)
    assert IndexVersion.newest_servable(store).withdrawn == frozenset()
    assert {i for items in results(store, base, tmp_path, k=20).values() for i in items}.isdisjoint(gone)


@pytest.mark.slow  # long fault / race test: `make test-slow` (keeps `make test` under 20 min on 2 cores)
def test_a_delete_racing_a_reindex_finetune_stays_in_force_and_the_finetune_commits(base, tmp_path, monkeypatch):
    """A takedown that lands while `reindex --finetune` trains: the fine-tune commits over it, its
    added items taught, the deleted ones never answered."""
    import pipelines.reindex as reindex_module
    from cart_core.index_version import is_servable, load_ids
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    gone = base["old_ids"][:2]
    (tmp_path / "gone.txt").write_text("\n".join(gone) + "\n")
    real = reindex_module.crash_point

    def takedown_at_commit(name):
        if name == "after_training":  # the fine-tune has trained and is about to commit
            run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
        real(name)

    monkeypatch.setattr(reindex_module, "crash_point", takedown_at_commit)
    run_reindex(store, small_config("reindex.finetune_epochs=1"), add=str(base["new"] / "items.parquet"),
                captions=str(base["new"] / "captions.parquet"), finetune=True)
    done = store.manifest()
    assert done.message.startswith("train") and is_servable(done)
    assert done.extra["pending"] and not untaught(store, done)
    table, _ = load_ids(store, done)
    assert not table.live[np.isin(table.item_ids, gone)].any()
    assert set(base["new_ids"]) <= set(table.item_ids[table.live].tolist())
    assert {i for items in results(store, base, tmp_path, k=20).values() for i in items}.isdisjoint(gone)


def test_a_training_commits_over_deletes_only(base, tmp_path):
    """What a training may commit over: deletes; never an add, an update or new captions, whose
    items the generator and its verifier have not learned (Store.commit then refuses as before)."""
    from pipelines.reindex import run_reindex
    from cart_core.index_version import deletes_since
    from pipelines.train import TRAIN_WRITES, TRAINED_FOR

    def over_deletes(store, base):
        return deletes_since(store, base, TRAINED_FOR, TRAIN_WRITES)

    store = fresh(base, tmp_path)
    trained = store.manifest()
    (tmp_path / "delete.txt").write_text(base["old_ids"][0] + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))
    deleted = store.manifest()
    assert over_deletes(store, trained) == deleted
    every = pq.read_table(base["root"] / "all" / "captions.parquet")
    later = every.filter(pc.and_(pc.equal(every["item_id"], base["old_ids"][1]), pc.equal(every["caption_index"], 4)))
    pq.write_table(later, tmp_path / "later.parquet")
    run_reindex(store, small_config(), captions=str(tmp_path / "later.parquet"), finetune=False)
    assert over_deletes(store, trained) == trained and over_deletes(store, deleted) == deleted
    captioned = store.manifest()
    run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"), finetune=False)
    assert over_deletes(store, captioned) == captioned
    added = store.manifest()
    update = pq.read_table(base["root"] / "old" / "items.parquet").to_pandas()
    update = update[update["item_id"] == base["old_ids"][2]]
    update["embedding"] = [np.asarray(e + 1e-4, np.float32) for e in update["embedding"]]
    pq.write_table(pa.Table.from_pandas(update, preserve_index=False), tmp_path / "update.parquet")
    run_reindex(store, small_config(), update=str(tmp_path / "update.parquet"), finetune=False)
    assert over_deletes(store, added) == added


def reimport_with_other_features(store, base, tmp_path, item: str, like: str, caption: str | None = None) -> None:
    """`cart import` of `item` again (after its delete) with the features of `like`."""
    from pipelines.importer import run_import

    every = pq.read_table(base["root"] / "all" / "items.parquet")
    row = every.filter(pc.equal(every["item_id"], item))
    donor = every.filter(pc.equal(every["item_id"], like))
    items = tmp_path / f"again-{item}.parquet"
    pq.write_table(row.set_column(row.column_names.index("embedding"), "embedding", donor.column("embedding")), items)
    captions = None
    if caption is not None:
        captions = tmp_path / f"again-{item}-captions.parquet"
        pq.write_table(pa.table({"item_id": [item], "caption": [caption]}), captions)
    run_import(store, str(items), str(captions) if captions else None)


def test_a_quantize_commits_over_deletes_only_and_never_keeps_content_taken_down(base, tmp_path):
    """A refit that fitted while items were added and one deleted is refused (the added items would
    lose their identifiers); one that fitted while an item was deleted and imported again with
    other features commits with that item dead (its identifier came from the content taken down)."""
    from cart_core.index_version import load_ids
    from cart_core.store import CommitConflict
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    gone, moved = base["old_ids"][0], base["old_ids"][1]
    (tmp_path / "gone.txt").write_text(gone + "\n")
    (tmp_path / "moved.txt").write_text(moved + "\n")

    def add_then_delete():
        run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"), finetune=False)
        run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))

    with pytest.raises(CommitConflict):
        run_quantize(store, small_config("identifiers.source=features"), refit=True, before_commit=add_then_delete)
    assert store.manifest().message.startswith("reindex")  # the add and the delete stand, nothing else

    def delete_then_import_again():
        run_reindex(store, small_config(), delete=str(tmp_path / "moved.txt"))
        reimport_with_other_features(store, base, tmp_path, moved, like=base["old_ids"][50])

    run_quantize(store, small_config("identifiers.source=features"), refit=True, before_commit=delete_then_import_again)
    done = store.manifest()
    assert done.message.startswith("quantize")
    table, _ = load_ids(store, done)
    assert not table.live[np.isin(table.item_ids, [gone, moved])].any()
    assert set(base["new_ids"]) <= set(table.item_ids[table.live].tolist())  # the add, fitted this time


def test_an_item_deleted_and_imported_again_is_withdrawn_from_the_version_that_answers(base, tmp_path):
    """While a refit awaits training, an older version answers; an item deleted and imported again
    with other content must not be answered from that version's identifier and captions, which
    are the content taken down."""
    from cart_core.index_version import IndexVersion
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    item = base["old_ids"][3]
    run_quantize(store, small_config(), refit=True)
    (tmp_path / "gone.txt").write_text(item + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    assert IndexVersion.newest_servable(store).withdrawn == frozenset([item])
    reimport_with_other_features(store, base, tmp_path, item, like=base["old_ids"][60], caption="a new caption")
    assert IndexVersion.newest_servable(store).withdrawn == frozenset([item])
    assert {i for items in results(store, base, tmp_path, k=20).values() for i in items}.isdisjoint([item])


def test_rollback_refuses_a_version_whose_files_were_compacted_and_says_what_it_brings_back(base, tmp_path, capsys):
    """A compact removes history before folders (killed between the two, no version names a
    removed folder); a rollback checks every file the version names, tombstones included, and
    says which deleted items it indexes again."""
    import shutil as sh

    from cart_core.store import StoreError
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_compact, run_rollback

    store = fresh(base, tmp_path)
    trained = store.manifest().version
    (tmp_path / "gone.txt").write_text("\n".join(base["old_ids"][:3]) + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    deleted = store.manifest()
    summary = run_rollback(store, trained)
    assert summary["brought_back"] == 3 and "3 items deleted since version" in capsys.readouterr().err
    sh.rmtree(Path(store.url) / deleted.extra["tombstones"][0])  # what a compact killed half-way used to leave
    with pytest.raises(StoreError, match="tombstones/.*needed by version"):
        run_rollback(store, deleted.version)
    removed = []
    original = store.remove

    def killed_after_history(path):  # the compact dies at its first folder
        if not path.startswith("manifests/"):
            raise KeyboardInterrupt("killed")
        removed.append(path)
        original(path)

    store.remove = killed_after_history
    with pytest.raises(KeyboardInterrupt):
        run_compact(store, keep=1)
    store.remove = original
    assert removed  # history went first
    for m in store.versions():
        assert all(store.exists(p) for p in referenced_paths(m)), m.version


def test_deleting_every_item_the_verifier_was_fitted_on_leaves_the_added_ones_served(base, tmp_path):
    """A whole catalog replaced (add the new items, delete the old): the verifier keeps no fitted
    centroid, and the version must still load and answer with the added items."""
    from cart_core.index_version import IndexVersion
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"),
                captions=str(base["new"] / "captions.parquet"))
    listed = base["old_ids"] + base["old_ids"][:2]  # two listed twice: deleted once, counted apart
    (tmp_path / "delete.txt").write_text("\n".join(listed) + "\n")
    counts = run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))["counts"]
    assert counts["deleted"] == N_OLD and counts["repeated_deletes"] == 2
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    caps = pq.read_table(base["new"] / "captions.parquet").to_pandas()
    rows, _ = retriever.search_batch(caps.caption.tolist()[:40], k=10, beam_size=20)
    answered = {str(table.item_ids[r]) for r in rows.reshape(-1) if r >= 0}
    assert answered and answered <= set(base["new_ids"])


def test_a_delete_retires_every_row_of_an_item_a_legacy_store_holds_twice(base, tmp_path):
    """Stores written before duplicate rows were refused may hold two untombstoned rows of one item
    (the later one live); deleting it must not make the older row live again."""
    from dataclasses import replace

    from cart_core.index_version import IndexVersion
    from cart_core.store import features_table
    from pipelines.parts import write_parts
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    item = base["old_ids"][4]
    manifest = store.manifest()
    write_parts(store, features_table([item], np.ones((1, 32), np.float32), "image", content_hashes=["legacy"]),
                "features/legacy-duplicate")
    store.commit(replace(manifest, features=manifest.features + ["features/legacy-duplicate"]), "legacy duplicate")
    assert IndexVersion.current(store).live_item_hashes([item])[item][0] == "features/legacy-duplicate"
    (tmp_path / "delete.txt").write_text(item + "\n")
    assert run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))["counts"]["deleted"] == 1
    assert IndexVersion.current(store).live_item_hashes([item]) == {}


def test_rerunning_the_import_after_a_delete_says_it_adds_the_item_back(base, tmp_path, capsys):
    from cart_core.index_version import IndexVersion
    from pipelines.importer import run_import
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    gone = base["old_ids"][:2]
    (tmp_path / "delete.txt").write_text("\n".join(gone) + "\n")
    run_reindex(store, small_config(), delete=str(tmp_path / "delete.txt"))
    assert IndexVersion.current(store).deleted_items(base["old_ids"]) == gone
    capsys.readouterr()
    counts = run_import(store, str(base["root"] / "old" / "items.parquet"))["counts"]
    assert counts["new_items"] == 2 and counts["readded_after_delete"] == 2
    assert f"2 item(s) deleted earlier ({gone[0]!r}, {gone[1]!r}) are in the input and are added back" \
        in capsys.readouterr().err
    assert IndexVersion.current(store).deleted_items(base["old_ids"]) == []


def test_update_replaces_an_item_under_the_same_key(base, tmp_path):
    from cart_core.index_version import load_ids
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    items = pq.read_table(base["root"] / "all" / "items.parquet").slice(0, 5).to_pandas()
    rng = np.random.default_rng(0)
    items["embedding"] = [np.asarray(-e + 0.01 * rng.normal(size=len(e)), dtype=np.float32) for e in items["embedding"]]
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp_path / "update.parquet")
    summary = run_reindex(store, small_config(), update=str(tmp_path / "update.parquet"), finetune=False)
    assert summary["counts"]["updated"] == 5
    table, _ = load_ids(store, store.manifest())
    for item in items["item_id"]:
        assert int(table.live[table.item_ids == item].sum()) == 1  # one live identifier per key


@pytest.mark.parametrize("point", ["after_features", "after_ids", "before_commit",
                                   pytest.param("after_training", marks=pytest.mark.slow)])  # the long one: test-slow
def test_crash_at_any_step_keeps_the_old_version_and_rerun_completes(base, tmp_path, monkeypatch, point):
    from cart_core.index_version import load_ids
    from pipelines.reindex import run_reindex
    from cart_core.index_version import is_servable

    store = fresh(base, tmp_path)
    before = store.manifest()
    args = dict(add=str(base["new"] / "items.parquet"), captions=str(base["new"] / "captions.parquet"))
    monkeypatch.setenv("CART_CRASH_AT", point)
    with pytest.raises(Exception, match=f"injected crash at {point}"):
        run_reindex(store, small_config("reindex.finetune_epochs=1"), finetune=True, **args)
    after_crash = store.manifest()
    if point == "after_training":  # the identifiers commit had landed; the fine-tune had not
        assert after_crash.version == before.version + 1 and after_crash.extra["pending"]
    else:
        assert after_crash == before
    assert is_servable(after_crash)
    monkeypatch.delenv("CART_CRASH_AT")
    run_reindex(store, small_config("reindex.finetune_epochs=1"), finetune=True, **args)
    done = store.manifest()
    assert done.extra["pending"] and not untaught(store, done) and done.generator != before.generator
    table, _ = load_ids(store, done)
    assert sorted(str(i) for i in table.item_ids) == sorted(base["old_ids"] + base["new_ids"])


def test_identifier_deltas_load_as_the_whole_table_and_compaction_folds_them(base, tmp_path):
    """A reindex writes only what it changed (append.parquet + dead.npy over the committed table);
    loading the chain gives exactly the table a whole rewrite gives, at every version, and
    `compact` folds the chain into one table that serves the same answers."""
    from cart_core.index_version import load_ids
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_compact

    new = pq.read_table(base["new"] / "items.parquet")
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    pq.write_table(new.slice(0, 15), first)
    pq.write_table(new.slice(15), second)
    (tmp_path / "delete.txt").write_text("\n".join(base["old_ids"][:5]))
    steps = [dict(add=str(first)), dict(delete=str(tmp_path / "delete.txt")), dict(add=str(second))]
    chained, whole = fresh(base, tmp_path / "chained"), fresh(base, tmp_path / "whole")
    for step in steps:
        run_reindex(chained, small_config("reindex.id_deltas=2"), finetune=False, **step)
        run_reindex(whole, small_config("reindex.id_deltas=0"), finetune=False, **step)
        a, b = load_ids(chained, chained.manifest())[0], load_ids(whole, whole.manifest())[0]
        assert a.item_ids.tolist() == b.item_ids.tolist() and a.vocab_sizes == b.vocab_sizes
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.live, b.live)
        assert not whole.manifest().extra["ids_chain"]
    # two deltas, then the chain is long enough and the third reindex rewrites the table whole
    versions = chained.versions()
    assert [len(m.extra.get("ids_chain") or []) for m in versions[-3:]] == [1, 2, 0]
    assert chained.exists(f"{versions[-3].ids}/append.parquet")
    assert not chained.exists(f"{versions[-3].ids}/ids.parquet")
    # compaction folds a chain into one table with the same identifiers and answers
    (tmp_path / "delete2.txt").write_text("\n".join(base["old_ids"][5:8]))
    run_reindex(chained, small_config(), finetune=False, delete=str(tmp_path / "delete2.txt"))
    assert chained.manifest().extra["ids_chain"]
    before, answers = load_ids(chained, chained.manifest())[0], results(chained, base, tmp_path)
    counts = run_compact(chained, keep=1)
    assert counts["id_deltas_folded"] == 1 and not chained.manifest().extra["ids_chain"]
    after = load_ids(chained, chained.manifest())[0]
    np.testing.assert_array_equal(after.codes, before.codes)
    np.testing.assert_array_equal(after.live, before.live)
    assert results(chained, base, tmp_path) == answers


def test_trained_store_serves_generate_then_verify_and_added_items_need_no_fallback(base, tmp_path):
    """`cart train` fits the verifier beside the generator; after an add, the hybrid reaches the
    new items through their prefixes and scores them with their pending caption centroid."""
    from cart_core.hybrid import VerifiedRetriever
    from cart_core.index_version import IndexVersion
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    manifest = store.manifest()
    for name in ("fusion.json", "verify.json", "captions.parquet", "terms.parquet", "aligner.safetensors",
                 "caption_metric.safetensors", "caption_predictor.safetensors", "caption_predictor.json"):
        assert store.exists(f"{manifest.generator}/verify/{name}"), name
    assert "held_out_feature_cos" in store.read_json(f"{manifest.generator}/verify/fusion.json")["report"]
    summary = run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"),
                          captions=str(base["new"] / "captions.parquet"), finetune=False)
    version = IndexVersion.newest_servable(store)
    retriever, table = load_retriever(version)
    assert isinstance(retriever, VerifiedRetriever)
    new_rows = [r for r, i in enumerate(table.item_ids) if i in set(base["new_ids"])]
    assert (np.abs(retriever.items.captions[new_rows].astype(np.float32)).sum(1) > 0).all()  # from the pending table
    # and their caption words (the BM25 signal, cart_core/lexical.py), from the pending table too
    assert "caption_bm25" in retriever.fusion.names
    # and the learned caption metric (cart_core/caption_metric.py) scores their centroids as well
    assert "caption_metric_cos" in retriever.fusion.names and retriever.items.metric is not None
    assert (retriever.items.metric_norms[new_rows] > 0).all()
    # items without captions have their caption side predicted from the feature (caption_predictor.py)
    assert "predicted_caption_cos" in retriever.fusion.names and retriever.items.predictor is not None
    assert (retriever.items.predictor_norms[new_rows] > 0).all()
    words_per_row = np.diff(retriever.items.terms.matrix.indptr)
    assert (words_per_row[new_rows] > 0).all() and (words_per_row[table.live] > 0).all()
    # added items are verified by their calibrated vector (cart_core/added_items.py), old ones by their feature
    calibration = summary["added_items_calibration"]
    assert 0.0 <= calibration["alpha"] <= 1.0 and calibration["captioned_items"] == N_NEW
    pending = version.pending()
    assert "feature" in pending.column_names
    row_of = {i: r for r, i in enumerate(table.item_ids) if table.live[r]}
    stored = np.stack(pending.column("feature").to_numpy(zero_copy_only=False))
    used = retriever.items.features[[row_of[i] for i in pending.column("item_id").to_pylist()]].astype(np.float32)
    assert np.allclose(used, stored, atol=2e-3)
    # new features for two pending items: their verification vectors, built from the old features,
    # are replaced (recalibrated from the new features with the item's stored captions, or zeros
    # so that the new raw feature is used)
    before = dict(zip(pending.column("item_id").to_pylist(), stored))
    items = pq.read_table(base["new"] / "items.parquet").slice(0, 2).to_pandas()
    rng = np.random.default_rng(1)
    items["embedding"] = [np.asarray(e + 0.05 * rng.normal(size=len(e)), dtype=np.float32) for e in items["embedding"]]
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp_path / "update.parquet")
    run_reindex(store, small_config(), update=str(tmp_path / "update.parquet"), finetune=False)
    version = IndexVersion.newest_servable(store)
    retriever, table = load_retriever(version)
    pending = version.pending()
    feature_of = dict(zip(pending.column("item_id").to_pylist(),
                          np.stack(pending.column("feature").to_numpy(zero_copy_only=False))))
    row_of = {i: r for r, i in enumerate(table.item_ids) if table.live[r]}
    for item, emb in zip(items["item_id"], items["embedding"]):
        new = feature_of[item]
        assert not np.allclose(new, before[item], atol=1e-3)
        want = new if np.abs(new).any() else emb / np.linalg.norm(emb)
        assert np.allclose(retriever.items.features[row_of[item]].astype(np.float32), want, atol=2e-3)
    assert (np.diff(retriever.items.terms.matrix.indptr)[[row_of[i] for i in base["new_ids"]]] > 0).all()  # kept
    untouched = [i for i in base["new_ids"] if i not in set(items["item_id"])][0]
    assert np.allclose(feature_of[untouched], before[untouched])
    assert retriever.trie.live_sorted.numpy().sum() == table.live.sum()  # pending items decodable, no masking
    generative, _ = load_retriever(version, mode="generative")
    assert generative.cfg.mode == "generative" and generative.items.captions is None
    # neighbour lists (cart_core/neighbors.py) are built at load from the served vectors, pending
    # items included; following them adds candidates and never a deleted item
    assert retriever.neighbors is None  # off unless asked for
    followed, table = load_retriever(version, query={"neighbor_seeds": 3, "neighbors": 6, "neighbor_probe": 1})
    assert followed.neighbors.shape == (len(table.item_ids), 6)  # the job's settings, not the fitted ones
    listed = set(followed.neighbors[[row_of[i] for i in base["new_ids"]]].ravel().tolist()) - {-1}
    assert listed and all(table.live[r] for r in listed)
    texts = [f"query {i}" for i in range(4)]
    rows, scores = followed.search(texts, k=5, beam_size=5)
    assert (rows >= 0).all() and np.all(np.diff(scores, axis=1) <= 1e-6)
    assert all(table.live[r] for r in rows.ravel())
    # every job takes the mode and the candidates from its own config (query_time), `cart serve` too
    from cart_core.index_version import IndexVersion
    from pipelines.serve import Snapshot
    from pipelines.verify import query_time

    served = Snapshot(IndexVersion.newest_servable(store), "cpu", query_time(small_config("verify.mode=generative", "verify.candidates=7")))
    assert served.retriever.cfg.mode == "generative" and served.retriever.cfg.candidates == 7


def test_captions_given_later_are_verified_from_that_commit(base, tmp_path):
    """Items added from features only, then captioned by a later `reindex --captions`, an old item
    given one more caption, and another updated in place in that run and captioned: each is
    verified with every caption it now has from that commit (centroid and words), the added ones
    with a calibrated verification vector, the untouched old one with its own feature; no
    identifier changes."""
    from cart_core.index_version import IndexVersion
    from cart_core.text import TextEncoder
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"), finetune=False)  # features only
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    row_of = {i: r for r, i in enumerate(table.item_ids) if table.live[r]}
    new_rows, old_item = [row_of[i] for i in base["new_ids"]], base["old_ids"][0]
    assert not np.abs(retriever.items.captions[new_rows].astype(np.float32)).any()
    raw = retriever.items.features[new_rows].astype(np.float32)
    old_feature = retriever.items.features[row_of[old_item]].astype(np.float32)
    every = pq.read_table(base["root"] / "all" / "captions.parquet")
    moved = base["old_ids"][1]  # updated in the same run (a nudge: same identifier) and captioned
    held_out = every.filter(pc.and_(pc.is_in(every["item_id"], pa.array([old_item, moved])),
                                    pc.equal(every["caption_index"], 4)))
    later = pa.concat_tables([pq.read_table(base["new"] / "captions.parquet"), held_out])
    pq.write_table(later, tmp_path / "later.parquet")
    update = pq.read_table(base["root"] / "old" / "items.parquet").to_pandas()
    update = update[update["item_id"] == moved]
    update["embedding"] = [np.asarray(e + 1e-4, np.float32) for e in update["embedding"]]
    pq.write_table(pa.Table.from_pandas(update, preserve_index=False), tmp_path / "update.parquet")
    run_reindex(store, small_config(), captions=str(tmp_path / "later.parquet"), update=str(tmp_path / "update.parquet"),
                finetune=False)
    version = IndexVersion.newest_servable(store)
    retriever, after = load_retriever(version)
    assert np.array_equal(after.codes[:len(table.codes)], table.codes)
    assert (np.abs(retriever.items.captions[new_rows].astype(np.float32)).sum(1) > 0).all()
    assert (np.diff(retriever.items.terms.matrix.indptr)[new_rows] > 0).all()
    assert not np.allclose(retriever.items.features[new_rows].astype(np.float32), raw, atol=1e-3)  # calibrated
    assert np.allclose(retriever.items.features[row_of[old_item]].astype(np.float32), old_feature, atol=2e-3)
    stored = version.queries(["item_id", "text"])
    encoder = TextEncoder(small_config().generator.text_encoder)
    for item in (old_item, moved):
        texts = [t for i, t in zip(stored.column("item_id").to_pylist(), stored.column("text").to_pylist()) if i == item]
        assert len(texts) == 5  # its four training captions and the one given now
        want = encoder.sentence_embeddings(texts).mean(0)
        want /= np.linalg.norm(want)  # the retriever keeps unit centroids
        row = int(np.flatnonzero((after.item_ids == item) & after.live)[0])
        assert np.allclose(retriever.items.captions[row].astype(np.float32), want, atol=2e-3), item


def test_trained_items_updated_then_captioned_are_recalibrated_from_their_new_features(base, tmp_path):
    """Two old items the verifier was fitted with, updated by one reindex (one moved to another
    prefix, so pending from then on; one nudged in place, same identifier, not pending), then each
    given one more caption by a later reindex: the aligner never saw their new features, so the
    captioning run calibrates both verification vectors from the new feature and all five captions,
    as for added items; identifiers stay what the update gave."""
    from cart_core.index_version import IndexVersion
    from cart_core.text import TextEncoder
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever
    from pipelines.verify import added_features

    store = fresh(base, tmp_path)
    moved, nudged = base["old_ids"][2], base["old_ids"][3]
    update = pq.read_table(base["root"] / "old" / "items.parquet").to_pandas()
    update = update[update["item_id"].isin([moved, nudged])].sort_values("item_id")
    rng = np.random.default_rng(1)
    update["embedding"] = [np.asarray(-e + 0.01 * rng.normal(size=len(e)) if i == moved else e + 1e-4, np.float32)
                           for i, e in zip(update["item_id"], update["embedding"])]
    new_features = {i: e for i, e in zip(update["item_id"], update["embedding"])}
    pq.write_table(pa.Table.from_pandas(update, preserve_index=False), tmp_path / "update.parquet")
    before, _ = IndexVersion.newest_servable(store).ids()
    run_reindex(store, small_config(), update=str(tmp_path / "update.parquet"), finetune=False)
    updated = IndexVersion.newest_servable(store)
    table, _ = updated.ids()
    row = {i: int(np.flatnonzero((table.item_ids == i) & table.live)[0]) for i in (moved, nudged)}
    was = {i: int(np.flatnonzero((before.item_ids == i) & before.live)[0]) for i in (moved, nudged)}
    assert not np.array_equal(table.codes[row[moved], :-1], before.codes[was[moved], :-1])  # another prefix
    assert np.array_equal(table.codes[row[nudged]], before.codes[was[nudged]])  # updated in place
    pending = updated.pending().column("item_id").to_pylist()
    assert moved in pending and nudged not in pending

    every = pq.read_table(base["root"] / "all" / "captions.parquet")
    every = every.filter(pc.is_in(every["item_id"], pa.array([moved, nudged])))
    pq.write_table(every.filter(pc.equal(every["caption_index"], 4)), tmp_path / "later.parquet")
    run_reindex(store, small_config(), captions=str(tmp_path / "later.parquet"), finetune=False)
    retriever, after = load_retriever(IndexVersion.newest_servable(store))
    assert np.array_equal(after.codes, table.codes)
    items, texts = every.column("item_id").to_pylist(), every.column("caption").to_pylist()
    order = sorted({moved, nudged})
    vectors = TextEncoder(small_config().generator.text_encoder).sentence_embeddings(texts)
    want, _ = added_features(updated, np.stack([new_features[i] for i in order]), vectors,
                             np.array([order.index(i) for i in items], np.int64))
    for j, item in enumerate(order):
        raw = new_features[item] / np.linalg.norm(new_features[item])
        assert not np.allclose(want[j], raw, atol=1e-2), item  # the calibration moves it
        assert np.allclose(retriever.items.features[row[item]].astype(np.float32), want[j], atol=2e-3), item


def test_a_deleted_item_added_again_comes_back_without_its_old_captions(base, tmp_path):
    """A delete retires the item's captions with it: added again (other features, no captions) it
    has none, in the training queries, the held-out queries, verification and the caption
    centroids a refit quantizes; captions given after the re-add are its only ones; compaction
    keeps the record."""
    from cart_core.index_version import IndexVersion
    from cart_core.text import TextEncoder
    from pipelines.check import run_check
    from pipelines.quantize import caption_centroids
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_compact
    from pipelines.search import load_retriever
    from pipelines.train import run_train
    from pipelines.verify import retired_since_fit

    store = fresh(base, tmp_path)
    item = base["old_ids"][4]

    def captions_of(version) -> list[str]:
        q = version.queries(["item_id", "text"])
        return [t for i, t in zip(q.column("item_id").to_pylist(), q.column("text").to_pylist()) if i == item]

    def held_out_of(version) -> list[str]:
        return [i for i in version.eval_queries().column("item_id").to_pylist() if i == item]

    assert len(captions_of(IndexVersion.current(store))) == 4 and len(held_out_of(IndexVersion.current(store))) == 1
    (tmp_path / "gone.txt").write_text(item)
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    assert captions_of(IndexVersion.current(store)) == []
    again = pq.read_table(base["root"] / "old" / "items.parquet").to_pandas()
    again = again[again["item_id"] == item]
    again["embedding"] = [np.asarray(-e, np.float32) for e in again["embedding"]]
    pq.write_table(pa.Table.from_pandas(again, preserve_index=False), tmp_path / "again.parquet")
    run_reindex(store, small_config(), add=str(tmp_path / "again.parquet"), finetune=False)
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    assert not np.abs(retriever.items.captions[row].astype(np.float32)).any()  # no centroid from old captions
    assert np.diff(retriever.items.terms.matrix.indptr)[row] == 0  # nor their words
    pq.write_table(pa.table({"item_id": [item], "caption": ["a kite over a frozen lake"]}), tmp_path / "new.parquet")
    run_reindex(store, small_config(), captions=str(tmp_path / "new.parquet"), finetune=False)
    run_compact(store, keep=1)
    assert run_check(store)["problems"] == []
    version = IndexVersion.current(store)
    assert captions_of(version) == ["a kite over a frozen lake"]
    assert held_out_of(version) == []  # `cart evaluate` does not ask for the deleted content either
    ids, vectors = caption_centroids(store, version.manifest, small_config())  # what `quantize --refit` reads
    want = TextEncoder(small_config().generator.text_encoder).sentence_embeddings(["a kite over a frozen lake"])[0]
    assert np.allclose(vectors[list(ids).index(item)], want, atol=1e-4)
    # a full training after the delete fits a verifier that knows it: the item's new caption is its
    # fitted centroid, nothing is left out as stale
    run_train(store, small_config())
    trained = IndexVersion.newest_servable(store)
    assert retired_since_fit(trained) == set()
    retriever, table = load_retriever(trained)
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    assert np.allclose(retriever.items.captions[row].astype(np.float32), want / np.linalg.norm(want), atol=2e-3)


def test_a_deleted_item_added_again_with_its_old_features_gets_no_old_captions_but_its_fitted_feature(base, tmp_path):
    """Added again with exactly the features the verifier was fitted on, a deleted item gets none
    of its retired captions (the verifier's own fitted rows for it are ignored, not only the stored
    captions). Captioned afterwards it is scored by the new captions alone, and by its own feature,
    not a calibrated one: the aligner was trained on that feature (its recorded content hash
    matches), so it scores like the fitted item it is, while an item the aligner never saw is
    calibrated from the same two captions."""
    from cart_core.index_version import IndexVersion
    from cart_core.text import TextEncoder
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    item = base["old_ids"][6]
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    feature_before = retriever.items.features[row].astype(np.float32)
    assert np.abs(retriever.items.captions[row].astype(np.float32)).any()  # captioned before the delete
    (tmp_path / "gone.txt").write_text(item)
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    again = pq.read_table(base["root"] / "old" / "items.parquet").to_pandas()
    pq.write_table(pa.Table.from_pandas(again[again["item_id"] == item], preserve_index=False),
                   tmp_path / "again.parquet")
    run_reindex(store, small_config(), add=str(tmp_path / "again.parquet"), finetune=False)
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    assert not np.abs(retriever.items.captions[row].astype(np.float32)).any()
    assert np.diff(retriever.items.terms.matrix.indptr)[row] == 0
    assert np.array_equal(retriever.items.features[row].astype(np.float32), feature_before)  # no captions: raw
    new = ["a kite over a frozen lake", "a red kite above the ice"]  # two: the calibration needs a second
    pq.write_table(pa.table({"item_id": [item, item], "caption": new}), tmp_path / "new.parquet")
    run_reindex(store, small_config(), captions=str(tmp_path / "new.parquet"), finetune=False)
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    want = TextEncoder(small_config().generator.text_encoder).sentence_embeddings(new).mean(axis=0)
    assert np.allclose(retriever.items.captions[row].astype(np.float32), want / np.linalg.norm(want), atol=2e-3)
    assert np.array_equal(retriever.items.features[row].astype(np.float32), feature_before)


def test_a_reindex_with_another_text_encoder_than_the_index_is_refused(base, tmp_path):
    from cart_core.errors import ConfigError
    from pipelines.reindex import run_reindex

    store = fresh(base, tmp_path)
    before = store.manifest()
    with pytest.raises(ConfigError, match=r"trained with text encoder 'minilm', this job's generator.text_encoder is "
                                          r"'mpnet'; run it with --set generator.text_encoder=minilm"):
        run_reindex(store, small_config("generator.text_encoder=mpnet"), add=str(base["new"] / "items.parquet"))
    assert store.manifest() == before


def test_drift_judges_only_items_built_like_the_fit():
    """Items added without captions to identifiers built from features and captions sit far from
    every centroid by construction (their caption half is empty): reported, not a reason to refit;
    the items built like the fitted ones still raise it when they drift."""
    from pipelines.reindex import drift_report

    fitted = {"mean_assign_sq_distance": 0.4, "mean_recon_error": 0.36, "imbalance": 1.2}
    codes = {"coarse": np.array([0, 1, 2, 3]), "assign_sq_distance": np.array([0.40, 0.42, 0.80, 0.82]),
             "recon_error": np.array([0.35, 0.37, 0.75, 0.73])}
    after = np.arange(8) % 4
    half = np.array([True, True, False, False])
    mixed = drift_report(codes, fitted, after, 4, 1.5, comparable=half)
    assert not mixed["refit_due"] and mixed["items"] == 4 and mixed["items_judged"] == 2
    assert mixed["mean_assign_sq_distance"] == pytest.approx(0.41)
    assert mixed["mean_not_judged_assign_sq_distance"] == pytest.approx(0.81)
    assert drift_report(codes, fitted, after, 4, 1.5)["refit_due"]  # every item judged: the empty halves count
    unjudged = drift_report(codes, fitted, after, 4, 1.5, comparable=np.zeros(4, bool))
    assert not unjudged["refit_due"] and unjudged["mean_assign_sq_distance"] is None
    drifted = {**codes, "assign_sq_distance": codes["assign_sq_distance"] * 2}
    assert drift_report(drifted, fitted, after, 4, 1.5, comparable=half)["reasons"][0].startswith("mean_assign_sq_distance")


def test_an_index_trained_without_a_verifier_finds_added_items_through_the_calibrated_fallback(base, tmp_path):
    """A generator trained with `verify.mode: generative` (or before verification existed) has no
    verify/ folder: added items are returned only by the dense fallback, whose acceptance
    threshold the reindex calibrates on old training captions; a delete recalibrates it."""
    from cart_core.fallback import HybridRetriever
    from cart_core.index_version import IndexVersion
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever

    store = fresh(base, tmp_path)
    shutil.rmtree(f"{store.url}/{store.manifest().generator}/verify")
    before = results(store, base, tmp_path)
    old_before = np.mean([q in before[q] for q in base["old_ids"]])
    run_reindex(store, small_config(), add=str(base["new"] / "items.parquet"),
                captions=str(base["new"] / "captions.parquet"), finetune=False)
    manifest = store.manifest()
    assert -1.0 <= manifest.extra["pending_threshold"] <= 1.0
    retriever, _ = load_retriever(IndexVersion(store, manifest))
    assert isinstance(retriever, HybridRetriever)
    found = results(store, base, tmp_path)
    # the generator never decodes untrained pending items: every hit is the fallback's
    assert np.mean([q in found[q] for q in base["new_ids"]]) >= 0.5
    # the gate keeps most old items' slots (generator alone: R@10 ~0.4 on this small config)
    assert np.mean([q in found[q] for q in base["old_ids"]]) >= old_before - 0.1
    (tmp_path / "gone.txt").write_text(base["new_ids"][0])
    run_reindex(store, small_config(), delete=str(tmp_path / "gone.txt"))
    after = store.manifest()
    assert after.extra["pending_threshold"] is not None
    assert base["new_ids"][0] not in IndexVersion(store, after).pending().column("item_id").to_pylist()
    assert base["new_ids"][0] not in {i for hits in results(store, base, tmp_path).values() for i in hits}


@pytest.mark.slow
def test_added_captions_are_embedded_by_the_encoder_a_generator_tuned(tmp_path, ray_local):
    """With generator.finetune_layers > 0 queries are scored in the tuned encoder's space, so an
    added item's caption centroid must come from that encoder, not the base one it started from."""
    from cart_core.generator import Generator
    from cart_core.index_version import IndexVersion
    from cart_core.text import TextEncoder
    from pipelines.importer import run_import
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex
    from pipelines.search import load_retriever
    from pipelines.train import run_train

    write_corpus(synthetic_corpus(n_items=70, dim=32, n_captions=5, seed=9), tmp_path / "all")
    ids = pq.read_table(tmp_path / "all" / "items.parquet").column("item_id").to_pylist()
    old, new = subset(tmp_path / "all", tmp_path / "old", ids[:60]), subset(tmp_path / "all", tmp_path / "new", ids[60:])
    cfg = small_config("generator.finetune_layers=1", "train.epochs=2", "identifiers.n_clusters=4")
    store = Store(tmp_path / "store")
    run_import(store, str(old / "items.parquet"), str(old / "captions.parquet"), holdout_caption_index=4)
    run_quantize(store, cfg)
    run_train(store, cfg)
    run_reindex(store, cfg, add=str(new / "items.parquet"), captions=str(new / "captions.parquet"), finetune=False)
    version = IndexVersion.newest_servable(store)
    retriever, table = load_retriever(version)
    with store.local_dir(f"{version.manifest.generator}/model") as folder:
        tuned = Generator.load(folder).text_encoder
    base = TextEncoder(cfg.generator.text_encoder)
    caps = pq.read_table(new / "captions.parquet")
    item, texts = ids[60], [t for i, t in zip(caps["item_id"].to_pylist(), caps["caption"].to_pylist()) if i == ids[60]]
    row = int(np.flatnonzero((table.item_ids == item) & table.live)[0])
    got = retriever.items.captions[row].astype(np.float32)
    want, was = (e.sentence_embeddings(texts).mean(0) for e in (tuned, base))
    assert np.allclose(got, want / np.linalg.norm(want), atol=2e-3)
    assert not np.allclose(got, was / np.linalg.norm(was), atol=2e-3)  # the tuned layer moved it
    # the fine-tune that teaches the generator the added items leaves that encoder as it is: the
    # verifier's centroids, the pending rows and the next reindex all embed with it
    run_reindex(store, cfg, finetune=True)
    tuned_again = IndexVersion.newest_servable(store).manifest
    assert tuned_again.generator != version.manifest.generator and not untaught(store, tuned_again)
    with store.local_dir(f"{tuned_again.generator}/model") as folder:
        after = Generator.load(folder).text_encoder
    assert np.array_equal(after.sentence_embeddings(texts), tuned.sentence_embeddings(texts))
