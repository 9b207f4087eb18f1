"""`cart serve`: online retrieval with Ray Serve.

    POST /search {"queries": ["a dog in the snow", ...], "k": 10}
      -> {"version": 7, "results": [{"query": ..., "items": [{"item_id": ..., "score": ...}, ...]}]}
    GET /healthz -> {"status": "ok", "version": 7, "items": 976}

Each query of a request is one call into a `@serve.batch` method, so queries from concurrent
requests share one beam search. A watcher thread polls the store's manifest; when a newer
servable version is committed it loads it beside the old one and swaps a single reference, so
requests in flight finish on the version they started with and none is dropped.
"""

import asyncio
import logging
import threading
import time

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from ray import serve

from cart_core.config import CartConfig
from cart_core.store import Store
from cart_core.index_version import IndexVersion
from pipelines.retrieve import load_retriever

MAX_QUERIES = 1024
MAX_K = 100
logger = logging.getLogger("ray.serve")
api = FastAPI(title="CART generative retrieval")


class SearchRequest(BaseModel):
    queries: list[str]
    k: int = 10


class Snapshot:
    """One servable version: what a batch searches against, swapped as a whole."""

    def __init__(self, store: Store, device: str):
        version = IndexVersion.newest_servable(store)
        self.version = version.version
        self.ids = (version.manifest.ids, version.manifest.generator)
        self.retriever, self.table = load_retriever(version, device)


@serve.deployment(name="cart-search")
@serve.ingress(api)
class CartSearch:
    def __init__(self, store_url: str, beam_size: int = 20, device: str = "cpu", poll_s: float = 2.0,
                 max_batch_size: int = 32, batch_wait_s: float = 0.01):
        self.store = Store(store_url)
        self.device, self.beam, self.poll_s = device, beam_size, poll_s
        self.current = Snapshot(self.store, device)
        self.search_one.set_max_batch_size(max_batch_size)
        self.search_one.set_batch_wait_timeout_s(batch_wait_s)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="cart-manifest-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                manifest = IndexVersion.newest_servable(self.store).manifest
                if manifest.version != self.current.version and \
                        (manifest.ids, manifest.generator) != self.current.ids:
                    new = Snapshot(self.store, self.device)
                    self.current = new  # one reference swap: in-flight batches keep the old one
                    logger.info("cart serve: switched to version %s", new.version)
                elif manifest.version != self.current.version:
                    self.current.version = manifest.version
            except Exception as exc:  # keep serving the loaded version; retry next poll
                logger.warning("cart serve: cannot load the committed version yet: %s", exc)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        snap = self.current
        return {"status": "ok", "version": snap.version, "items": int(snap.table.live.sum())}

    @api.post("/search")
    async def search(self, request: SearchRequest) -> dict:
        if not request.queries:
            raise HTTPException(400, "queries must be a non-empty list of strings")
        if len(request.queries) > MAX_QUERIES:
            raise HTTPException(400, f"at most {MAX_QUERIES} queries per request, got {len(request.queries)}")
        blank = [i for i, q in enumerate(request.queries) if not q.strip()]
        if blank:
            raise HTTPException(400, f"query {blank[0]} is empty")
        if not 1 <= request.k <= MAX_K:
            raise HTTPException(400, f"k must be in [1, {MAX_K}], got {request.k}")
        answers = await asyncio.gather(*[self.search_one((q, request.k)) for q in request.queries])
        version = answers[0][0]
        return {"version": version, "results": [{"query": q, "items": items}
                                                for q, (_, items) in zip(request.queries, answers)]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def search_one(self, calls: list[tuple[str, int]]) -> list[tuple[int, list[dict]]]:
        snap = self.current
        k = max(k for _, k in calls)
        rows, scores = await asyncio.to_thread(
            snap.retriever.search_batch, [q for q, _ in calls], k, max(self.beam, k))
        out = []
        for (_, want), r, s in zip(calls, rows, scores):
            items = [{"item_id": str(snap.table.item_ids[i]), "score": float(v)}
                     for i, v in zip(r[:want], s[:want]) if i >= 0]
            out.append((snap.version, items))
        return out


def build_app(store_url: str, cfg: CartConfig):
    device = "cuda" if cfg.jobs.retrieve_num_gpus > 0 else "cpu"
    return CartSearch.options(
        num_replicas=cfg.jobs.serve_replicas,
        max_ongoing_requests=max(64, 4 * cfg.jobs.serve_max_batch_size),
        ray_actor_options={"num_cpus": cfg.jobs.retrieve_num_cpus, "num_gpus": cfg.jobs.retrieve_num_gpus},
    ).bind(store_url, cfg.eval.beam_size, device, 2.0, cfg.jobs.serve_max_batch_size, cfg.jobs.serve_batch_wait_s)


def app_builder(args: dict):
    """Import path for `serve run` / KubeRay RayService: args {"store": URL, "config": YAML path,
    "overrides": ["key=value", ...]}."""
    from cart_core.config import load_config
    from pipelines.data_paths import REPO_ROOT

    config = args.get("config") or REPO_ROOT / "configs" / "default.yaml"  # as the CLI
    return build_app(args["store"], load_config(config, args.get("overrides") or []))


def run_serve(store: Store, cfg: CartConfig, host: str = "127.0.0.1", port: int = 8000,
              address: str | None = None, block: bool = True) -> None:
    from pipelines.runtime import init_ray, log

    IndexVersion.newest_servable(store).ids()  # fail fast, with the reason, before starting anything
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(store.url, cfg), name="cart", route_prefix="/")
    log("serve", f"serving {store.url} at http://{host}:{port} (POST /search, GET /healthz); Ctrl-C stops")
    while block:
        time.sleep(3600)
