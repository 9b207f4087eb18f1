"""`cart serve` over real HTTP: answers, input errors, and a version switch under live traffic."""
from __future__ import annotations

import threading
import time

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
    run_serve(store, small_config(), host="127.0.0.1", port=port, block=False)
    yield store, f"http://127.0.0.1:{port}", folder
    serve.shutdown()


def traffic(url: str, queries: list[str], versions: set, failures: list, stop: threading.Event) -> None:
    """Search until stopped; record the version of every answer and every failed request."""
    while not stop.is_set():
        try:
            r = requests.post(f"{url}/search", json={"queries": queries, "k": 10}, timeout=60)
            if r.status_code != 200:
                failures.append(r.status_code)
            else:
                versions.add(r.json()["version"])
        except requests.RequestException as exc:
            failures.append(repr(exc))


def test_search_and_health(served):
    store, url, _ = served
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health == {"status": "ok", "version": store.manifest().version, "items": 120}
    body = requests.post(f"{url}/search", json={"queries": ["a red dog on the beach", "a cat"], "k": 4},
                         timeout=60).json()
    assert [r["query"] for r in body["results"]] == ["a red dog on the beach", "a cat"]
    for result in body["results"]:
        scores = [item["score"] for item in result["items"]]
        assert len(result["items"]) == 4 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("payload, message", [
    ({"queries": [], "k": 3}, "non-empty list"),
    ({"queries": ["ok", "  "], "k": 3}, "query 1 is empty"),
    ({"queries": ["ok"], "k": 0}, "k must be in"),
])
def test_bad_requests_get_400_with_reason(served, payload, message):
    _, url, _ = served
    response = requests.post(f"{url}/search", json=payload, timeout=30)
    assert response.status_code == 400 and message in response.json()["detail"]


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
    """Items added by a reindex are served (through the dense fallback) with no failed request."""
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
    body = requests.post(f"{url}/search", json={"queries": [probe], "k": 10}, timeout=60).json()
    assert target in [item["item_id"] for item in body["results"][0]["items"]]
