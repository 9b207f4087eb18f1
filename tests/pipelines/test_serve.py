"""`cart serve` over real HTTP: answers, input errors, limits, the bearer token, isolation of one
client's bad queries from the others, /healthz when the store cannot be read, and a version switch
under live traffic."""
from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from cart_core.store import Store
from tests.pipelines.conftest import free_port
from tests.pipelines.test_jobs import import_and_quantize, small_config


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local):
    from ray import serve

    from cart_core.corpus import synthetic_corpus, write_corpus
    from pipelines.serve import run_serve
    from pipelines.train import run_train

    from tests.pipelines.test_reindex import subset

    folder = tmp_path_factory.mktemp("serve")
    write_corpus(synthetic_corpus(n_items=150, dim=32, n_captions=5, seed=5), folder / "all")
    ids = pq.read_table(folder / "all" / "items.parquet").column("item_id").to_pylist()
    subset(folder / "all", folder / "corpus", ids[:120])
    subset(folder / "all", folder / "later", ids[120:], [0, 1, 2, 3])
    store = Store(folder / "store")
    import_and_quantize(store, folder / "corpus")
    run_train(store, small_config("train.epochs=1"))
    port = free_port()
    (folder / "token").write_text(TOKEN + "\n")
    run_serve(store, small_config("serve.watcher_failures=2"), host="127.0.0.1", port=port, block=False,
              token_file=str(folder / "token"))
    yield store, f"http://127.0.0.1:{port}", folder
    serve.shutdown()


TOKEN = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def traffic(url: str, queries: list[str], versions: set, failures: list, stop: threading.Event) -> None:
    """Search until stopped; record the version of every answer and every failed request."""
    while not stop.is_set():
        try:
            r = requests.post(f"{url}/search", json={"queries": queries, "k": 10}, headers=AUTH, timeout=60)
            if r.status_code != 200:
                failures.append(r.status_code)
            else:
                versions.add(r.json()["version"])
        except requests.RequestException as exc:
            failures.append(repr(exc))


def test_search_and_health(served):
    store, url, _ = served
    health = requests.get(f"{url}/healthz", timeout=30).json()
    version = store.manifest().version
    assert health == {"status": "ok", "version": version, "as_of": version, "items": 120}
    body = requests.post(f"{url}/search", json={"queries": ["a red dog on the beach", "a cat"], "k": 4},
                         headers=AUTH, timeout=60).json()
    assert "results" in body, body
    assert [r["query"] for r in body["results"]] == ["a red dog on the beach", "a cat"]
    for result in body["results"]:
        scores = [item["score"] for item in result["items"]]
        assert len(result["items"]) == 4 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("payload, status, message", [
    ({"queries": [], "k": 3}, 400, "queries must be a non-empty list of strings"),
    ({"queries": ["ok", "  "], "k": 3}, 400, "query 1: query is empty"),
    ({"queries": ["ok", "\ud800 lone surrogate"], "k": 3}, 400, "query 1: query is not valid Unicode"),
    ({"queries": ["ok", 7], "k": 3}, 400, "query 1: query must be text, got int"),
    ({"queries": ["x" * 1001], "k": 3}, 400, "query 0: query is 1001 characters; at most 1000"),
    ({"queries": ["ok"] * 257}, 413, "at most 256 queries per request, got 257"),
    ({"queries": ["ok"], "k": 0}, 400, "k must be an integer in [1, 100], got 0"),
    ({"queries": ["ok"], "k": 101}, 400, "raise queries.max_k"),
    ({"queries": ["ok"], "k": "3"}, 400, "k must be an integer"),
    ({"query": ["ok"]}, 400, "unknown field(s) 'query'"),
    ({"queries": ["ok"], "q" * 100_000: 1}, 400, "(100000 characters)"),
    (["ok"], 400, "body must be a JSON object"),
])
def test_bad_requests_get_4xx_with_reason(served, payload, status, message):
    _, url, _ = served
    response = requests.post(f"{url}/search", json=payload, headers=AUTH, timeout=30)
    assert response.status_code == status and message in response.json()["detail"]
    assert len(response.content) < 400, "the answer never echoes the request"


def test_not_json_and_oversized_bodies_are_refused_fast(served):
    _, url, _ = served
    response = requests.post(f"{url}/search", data=b"{not json", headers=AUTH, timeout=30)
    assert response.status_code == 400 and "body is not JSON" in response.json()["detail"]
    big = json.dumps({"queries": ["a dog " * 1000] * 1000, "k": 3}).encode()  # 6 MB
    t0 = time.perf_counter()
    response = requests.post(f"{url}/search", data=big, headers={**AUTH, "Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == 413 and "at most 1000000" in response.json()["detail"], response.text[:300]
    assert time.perf_counter() - t0 < 1.0

    def chunks():  # no Content-Length: refused while it streams
        for _ in range(60):
            yield b" " * 100_000
    response = requests.post(f"{url}/search", data=chunks(), headers=AUTH, timeout=30)
    assert response.status_code == 413 and "exceeds 1000000 bytes" in response.json()["detail"]


@pytest.mark.parametrize("body", [
    b"[" * 100_000,  # nested past Python's recursion limit
    b'{"queries": ["ok"], "k": ' + b"9" * 5000 + b"}",  # past Python's integer-string limit
    b'{"queries": [' + b"9" * 5000 + b"]}",
])
def test_json_python_cannot_parse_is_a_400_not_a_500(served, body):
    _, url, _ = served
    response = requests.post(f"{url}/search", data=body, headers={**AUTH, "Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == 400 and "body is not JSON we accept" in response.json()["detail"]
    assert len(response.content) < 400


def test_a_query_answers_the_same_whatever_k_another_client_asks(served):
    """A batch mixes clients: one client's k above the beam widens the beam, and a wider beam
    changes which candidates are verified; each beam width is searched apart (pipelines/serve.py)."""
    from cart_core.index_version import IndexVersion
    from pipelines.serve import Snapshot, answer_calls
    from pipelines.verify import query_time

    store, _, folder = served
    snap = Snapshot(IndexVersion.newest_servable(store), "cpu", query_time(small_config("verify.candidates=25")))
    texts = pq.read_table(folder / "all" / "captions.parquet").column("caption").to_pylist()[:60]
    alone = answer_calls(snap, [(t, 10) for t in texts], beam_size=10)
    mixed = answer_calls(snap, [(t, 10) for t in texts] + [("a dog", 100)], beam_size=10)
    assert mixed[:-1] == alone and len(mixed[-1][1]) == 100
    rows, _ = snap.retriever.search_batch(texts, 10, 100)  # what one shared batch used to answer
    shared = [[str(snap.table.item_ids[i]) for i in r] for r in rows]
    assert shared != [[item["item_id"] for item in items] for _, items in alone], "the case needs a wider beam to matter"


def test_a_damaged_generator_is_refused_before_serve_starts_naming_its_folder(served, tmp_path):
    """A replica that cannot load reports only "Deploying application cart failed" after ~30 s: the
    driver loads the retriever first, and a damaged file is a StoreError (exit 2) naming its folder."""
    from cart_core.store import StoreError
    from pipelines.serve import run_serve
    from tests.pipelines.test_jobs import copy_of

    store = copy_of(served[0], tmp_path)
    weights = next((Path(store.url) / "generator").glob("*/model/generator.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match=r"generator/.+: the generator cannot be loaded"):
        run_serve(store, small_config(), host="127.0.0.1", port=free_port(), block=False)
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}])
def test_search_needs_the_token(served, headers):
    _, url, _ = served
    response = requests.post(f"{url}/search", json={"queries": ["a dog"], "k": 3}, headers=headers, timeout=30)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["detail"] == "missing or wrong bearer token"
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no token
    for page in ("/docs", "/redoc", "/openapi.json"):  # nothing else answers without the token
        assert requests.get(f"{url}{page}", timeout=30).status_code == 404, page


def test_one_clients_bad_queries_fail_no_other_request(served):
    """The issue's case: 16 clients searching while one sends a lone surrogate in every request."""
    _, url, _ = served
    bad_statuses, failures = [], []

    def good(i: int) -> None:
        for _ in range(5):
            r = requests.post(f"{url}/search", json={"queries": [f"a dog number {i}", "a boat"], "k": 5},
                              headers=AUTH, timeout=120)
            if r.status_code != 200 or len(r.json()["results"]) != 2:
                failures.append(r.status_code)

    def bad() -> None:
        for _ in range(20):
            r = requests.post(f"{url}/search", json={"queries": ["a cat", "\ud800"], "k": 5}, headers=AUTH,
                              timeout=120)
            bad_statuses.append(r.status_code)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(16)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and set(bad_statuses) == {400}


def test_healthz_turns_unhealthy_when_the_store_cannot_be_read(served):
    store, url, _ = served
    manifest = store.root.rstrip("/") + "/manifest.json"
    saved = store.fs.cat_file(manifest)
    try:
        store.fs.pipe_file(manifest, b"{ damaged")
        deadline = time.time() + 30
        while time.time() < deadline:
            health = requests.get(f"{url}/healthz", timeout=30)
            if health.status_code == 503:
                break
            time.sleep(0.5)
        assert health.status_code == 503 and "could not be read 2 times in a row" in health.json()["reason"]
        search = requests.post(f"{url}/search", json={"queries": ["a dog"], "k": 3}, headers=AUTH, timeout=60)
        assert search.status_code == 200  # the loaded version keeps serving
    finally:
        store.fs.pipe_file(manifest, saved)
    deadline = time.time() + 30
    while time.time() < deadline and requests.get(f"{url}/healthz", timeout=30).status_code != 200:
        time.sleep(0.5)
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def test_switches_version_without_dropping_requests(served):
    from pipelines.train import run_train

    store, url, _ = served
    old = requests.get(f"{url}/healthz", timeout=30).json()["version"]
    seen, failures, stop = set(), [], threading.Event()
    threads = [threading.Thread(target=traffic, args=(url, ["a dog", "a boat in the river"], seen, failures, stop))
               for _ in range(2)]
    for t in threads:
        t.start()
    run_train(store, small_config("train.epochs=1", "train.seed=1"))  # commits a new version
    new = store.manifest().version
    deadline = time.time() + 60
    while time.time() < deadline and new not in seen:
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert not failures
    assert old in seen and new in seen and new > old


def test_reindex_under_live_traffic(served):
    """Items added by a reindex are served (reached by prefix and verified) with no failed request."""
    from pipelines.reindex import run_reindex

    store, url, folder = served
    failures, versions, stop = [], set(), threading.Event()
    later = pq.read_table(folder / "later" / "captions.parquet")
    probe = later.column("caption").to_pylist()[0]
    target = later.column("item_id").to_pylist()[0]
    thread = threading.Thread(target=traffic, args=(url, [probe], versions, failures, stop))
    thread.start()
    run_reindex(store, small_config(), add=str(folder / "later" / "items.parquet"),
                captions=str(folder / "later" / "captions.parquet"), finetune=False)
    new = store.manifest().version
    deadline = time.time() + 60
    while time.time() < deadline and new not in versions:
        time.sleep(0.5)
    stop.set()
    thread.join()
    assert not failures and new in versions
    assert requests.get(f"{url}/healthz", timeout=30).json()["items"] == 150
    body = requests.post(f"{url}/search", json={"queries": [probe], "k": 10}, headers=AUTH, timeout=60).json()
    assert target in [item["item_id"] for item in body["results"][0]["items"]]


def answered_probe(url: str, folder: Path, caption_index: int) -> tuple[str, str]:
    """(item, its caption) for the first of 40 captions #caption_index whose item the server
    answers in its top 5: an item a delete visibly takes away."""
    caps = pq.read_table(folder / "all" / "captions.parquet").to_pandas()
    probes = caps[caps.caption_index == caption_index].head(40)
    body = requests.post(f"{url}/search", json={"queries": probes.caption.tolist(), "k": 5}, headers=AUTH,
                         timeout=60).json()
    found = [row for row, result in zip(probes.itertuples(), body["results"])
             if row.item_id in [item["item_id"] for item in result["items"]]]
    assert found, "no probe finds its item: the case needs one"
    return found[0].item_id, found[0].caption


def search_items(url: str, query: str, k: int = 50) -> tuple[dict, list[str]]:
    body = requests.post(f"{url}/search", json={"queries": [query], "k": k}, headers=AUTH, timeout=60).json()
    return body, [item["item_id"] for item in body["results"][0]["items"]]


def wait_for(url: str, done, seconds: float = 60) -> dict:
    """/healthz's body once done(body) holds (whatever its status), or the last one after `seconds`."""
    deadline = time.time() + seconds
    while True:
        health = requests.get(f"{url}/healthz", timeout=30).json()
        if done(health) or time.time() > deadline:
            return health
        time.sleep(0.5)


def test_a_delete_is_in_force_before_the_version_it_commits_has_loaded(served):
    """A delete reaches a live `cart serve` within a poll without waiting for the full load of the
    version it commits: here that load fails (the generator's weights are damaged on disk after
    the replica loaded them), and the loaded version answers without the item, `as_of` naming the
    delete, `version` not moving, /healthz saying why; with the file back, the new version answers."""
    from pipelines.reindex import run_reindex

    store, url, folder = served
    target, query = answered_probe(url, folder, caption_index=1)
    before = requests.get(f"{url}/healthz", timeout=30).json()
    weights = f"{store.root.rstrip('/')}/{store.manifest().generator}/model/generator.safetensors"
    saved = store.fs.cat_file(weights)
    try:
        store.fs.pipe_file(weights, b"not a safetensors file")
        (folder / "delete.txt").write_text(target + "\n")
        run_reindex(store, small_config(), delete=str(folder / "delete.txt"))
        committed = store.manifest().version
        health = wait_for(url, lambda h: h["as_of"] == committed)
        assert (health["version"], health["as_of"], health["items"]) == (before["version"], committed,
                                                                        before["items"] - 1)
        body, items = search_items(url, query)
        assert (body["version"], body["as_of"]) == (before["version"], committed) and target not in items
        assert len(items) == 50  # everything else still answers
        health = wait_for(url, lambda h: h["status"] != "ok", 30)
        assert health["status"] == "unhealthy" and "could not be loaded 2 times in a row" in health["reason"]
        assert health["version"] == before["version"] and health["as_of"] == committed
    finally:
        store.fs.pipe_file(weights, saved)
    health = wait_for(url, lambda h: h["status"] == "ok" and h["version"] == committed, 90)
    assert (health["status"], health["version"], health["as_of"]) == ("ok", committed, committed)
    body, items = search_items(url, query)
    assert body["version"] == committed and target not in items


def test_a_delete_after_a_compact_that_removed_the_loaded_versions_files(served):
    """`cart compact --keep 1` removes the files of the version the replica loaded; the replica
    never reads them again (it keeps that version's live rows in memory), so a delete committed
    right after is withdrawn within a poll and the newest version loads."""
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_compact

    store, url, folder = served
    target, query = answered_probe(url, folder, caption_index=2)
    before = requests.get(f"{url}/healthz", timeout=30).json()
    loaded = store.version(before["version"])
    assert loaded.extra.get("tombstones"), "the case needs a loaded version that names tombstones"
    run_compact(store, keep=1)
    assert not any(store.exists(path) for path in loaded.extra["tombstones"])  # what the replica loaded is gone
    (folder / "after-compact.txt").write_text(target + "\n")
    run_reindex(store, small_config(), delete=str(folder / "after-compact.txt"))
    committed = store.manifest().version
    health = wait_for(url, lambda h: h["status"] == "ok" and h["version"] == h["as_of"] == committed, 90)
    assert (health["status"], health["version"], health["as_of"], health["items"]) == (
        "ok", committed, committed, before["items"] - 1)
    body, items = search_items(url, query)
    assert body["version"] == committed and target not in items


def test_a_takedown_while_a_refit_awaits_training_is_served_at_once(served):
    """Last in this module (it leaves the newest version without a generator): after `cart
    quantize --refit`, the trained version keeps answering; a delete committed then withdraws the
    item from its answers within a poll, `as_of` names the delete's version, `version` does not move."""
    from pipelines.quantize import run_quantize
    from pipelines.reindex import run_reindex

    store, url, folder = served
    caps = pq.read_table(folder / "all" / "captions.parquet").to_pandas()
    before = requests.get(f"{url}/healthz", timeout=30).json()
    probes = caps[caps.caption_index == 0].head(40)
    body = requests.post(f"{url}/search", json={"queries": probes.caption.tolist(), "k": 5}, headers=AUTH,
                         timeout=60).json()
    found = [row.item_id for row, result in zip(probes.itertuples(), body["results"])
             if row.item_id in [item["item_id"] for item in result["items"]]]
    assert found, "no probe finds its item: the case needs one"
    target = found[0]
    run_quantize(store, small_config(), refit=True)  # identifiers `cart train` has not learned yet
    (folder / "takedown.txt").write_text(target + "\n")
    run_reindex(store, small_config(), delete=str(folder / "takedown.txt"))
    committed = store.manifest().version
    deadline = time.time() + 60
    while time.time() < deadline and requests.get(f"{url}/healthz", timeout=30).json()["as_of"] != committed:
        time.sleep(0.5)
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health == {"status": "ok", "version": before["version"], "as_of": committed, "items": before["items"] - 1}
    query = probes[probes.item_id == target].caption.tolist()
    body = requests.post(f"{url}/search", json={"queries": query, "k": 50}, headers=AUTH, timeout=60).json()
    assert body["version"] == before["version"] and body["as_of"] == committed
    assert target not in [item["item_id"] for item in body["results"][0]["items"]]
