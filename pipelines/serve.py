"""`cart serve`: online retrieval with Ray Serve.

    POST /search {"queries": ["a dog in the snow", ...], "k": 10}
      -> {"version": 7, "as_of": 9, "results": [{"query": ..., "items": [{"item_id": ..., "score": ...}, ...]}]}
    GET /healthz -> {"status": "ok", "version": 7, "as_of": 9, "items": 976}   (503 + reason when unhealthy)

`version` is the version that answers (the newest servable one); `as_of` the newest committed
version whose deletes the answers respect: while `cart quantize` has committed identifiers that
`cart train` has not learned yet, an older version answers, and a takedown committed meanwhile
withdraws its items from it (IndexVersion.withdrawn) with `as_of` moving and `version` not.

Each query of a request is one call into a `@serve.batch` method, so queries from concurrent
requests share one beam search. What one client sends cannot fail another's request:
- a request is checked before any of it joins a batch: body size (413, refused from its
  Content-Length or while it streams, never read whole), queries per request (413), every query
  by the rules `cart retrieve` applies (pipelines/queries.py: normalised, 400 with the reason);
- a batch that raises is retried query by query, so only the request whose query fails gets 500;
- answers echo the normalised query, which the rules bound, never the raw body.
With a token configured (`--token-file`, or the `serve.token_env` variable on the replicas)
/search needs `Authorization: Bearer <token>` (constant-time compare of SHA-256 digests; 401
otherwise); /healthz stays open for load-balancer and Kubernetes probes.

A watcher thread polls the store's manifest. At a new commit it first withdraws what the commit
deleted from the loaded version (a trie mask, no reload: a takedown is in force within a poll at
any catalog size, even while the new version loads or if it cannot), then a loader thread loads
the version that answers beside the old one and swaps a single reference, so requests in flight
finish on the version they started with and none is dropped; deletes committed during that load
are withdrawn from it before it answers. After `serve.watcher_failures` failed polls or loads in
a row (each failure doubles the wait before the next try, up to 30 s) /healthz answers 503 with
the reason while search keeps serving the loaded version, deletes withdrawn.
"""

import asyncio
import copy
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cart_core.config import CartConfig, QueryConfig, ServeConfig
from cart_core.errors import BadInput, InputNotFound, first_line, shown
from cart_core.index_version import IndexVersion, withdraw, withdrawn_since
from cart_core.store import Manifest, Store
from pipelines.leases import newest_servable_held
from pipelines.queries import QueryRefused, check_k, normalize_query
from pipelines.search import load_generator, load_retriever
from pipelines.verify import has_verifier, load_verifier_files, query_time, verify_settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger("ray.serve")
# no /docs, /redoc or /openapi.json: they would answer without the bearer token
api = FastAPI(title="CART generative retrieval", docs_url=None, redoc_url=None, openapi_url=None)


class Refused(Exception):
    """A request refused before it reaches the model: HTTP status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class QueryFailed:
    """The answer slot of a query whose search raised (the batch's other queries are answered)."""

    def __init__(self, exc: BaseException) -> None:
        self.reason = f"{type(exc).__name__}: {first_line(exc)}"


class Snapshot:
    """One servable version: what a batch searches against, swapped as a whole."""

    def __init__(self, version: IndexVersion, device: str, query: dict | None = None, as_of: int | None = None):
        self.version = version.version
        self.as_of = version.version if as_of is None else as_of  # the committed version resolved against
        self.key = Snapshot.key_of(version)
        self.retriever, self.table = load_retriever(version, device, query=query)
        # what its table was read from, kept in memory: deletes since count against it even after
        # `cart compact` removed that version's files
        self.source = version.pinned()
        self.withdrawn_at: dict[str, int] = {}  # item -> the commit it was withdrawn for (as_of_commit)

    @staticmethod
    def key_of(version: IndexVersion) -> tuple:
        """What the loaded retriever depends on: a new version with the same key needs no reload
        (unless the snapshot has withdrawn items since: then it answers for less than its key)."""
        return version.manifest.ids, version.manifest.generator, version.withdrawn

    def as_of_commit(self, store: Store, committed: Manifest) -> "Snapshot":
        """This snapshot answering as of `committed`: the items deleted since its version
        (IndexVersion.withdrawn_since) are taken away from the loaded retriever at once
        (answering_only: a trie mask, no reload), so a takedown is in force within a poll
        however long the full load of the new version takes, or if it fails."""
        gone = withdrawn_since(self.table, self.source, IndexVersion(store, committed))
        out = self.withdrawing({item: committed.version for item in gone})
        out.as_of = committed.version
        return out

    def withdrawing(self, items: dict[str, int]) -> "Snapshot":
        """A copy (swapped in whole: a batch never sees half-updated labels) that no longer answers
        `items` (item -> the commit that deleted it), remembered in `withdrawn_at`."""
        out = copy.copy(self)
        live = withdraw(self.table, frozenset(items)).live
        if items and (live != self.table.live).any():
            out.retriever = self.retriever.answering_only(live)
            out.table = out.retriever.table
            out.withdrawn_at = {**self.withdrawn_at, **{i: c for i, c in items.items() if i not in self.withdrawn_at}}
            logger.info("cart serve: %d items deleted as of version %s withdrawn from version %s",
                        int((live != self.table.live).sum()), max(items.values()), self.version)
        return out


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def resolve_token(cfg: ServeConfig, token_file: str | None) -> str | None:
    """The bearer token from --token-file, else from the `serve.token_env` variable, else None."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise InputNotFound(f"{token_file}: token file not found")
        token = path.read_text().strip()
        if len(token) < 16:
            raise BadInput(f"{token_file}: the token must be at least 16 characters, got {len(token)}")
        return token
    return os.environ.get(cfg.token_env) or None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"request body is {int(declared)} bytes; at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"request body exceeds {limit} bytes")
    return bytes(body)


def parse_search(body: bytes, rules: QueryConfig) -> tuple[list[str], int]:
    """(normalised queries, k) of a /search body, or Refused with the first reason."""
    try:
        return _parse_search(body, rules)
    except RecursionError:  # JSON the parser took, nested too deep to describe in a message
        raise Refused(400, "body is not JSON we accept (nested too deep)") from None


def _parse_search(body: bytes, rules: QueryConfig) -> tuple[list[str], int]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, nesting too deep, a 5,000-digit number
        raise Refused(400, f"body is not JSON we accept ({type(exc).__name__}: {first_line(exc, 120)})") from None
    if not isinstance(payload, dict):
        raise Refused(400, "body must be a JSON object {\"queries\": [...], \"k\": 10}")
    unknown = sorted(set(payload) - {"queries", "k"})
    if unknown:
        raise Refused(400, f"unknown field(s) {', '.join(shown(u) for u in unknown[:5])}; expected queries, k")
    queries = payload.get("queries")
    if not isinstance(queries, list) or not queries:
        raise Refused(400, "queries must be a non-empty list of strings")
    if len(queries) > rules.max_per_request:
        raise Refused(413, f"at most {rules.max_per_request} queries per request, got {len(queries)}")
    try:
        k = check_k(payload.get("k", 10), rules)
    except QueryRefused as exc:
        raise Refused(400, exc.reason) from None
    texts = []
    for i, query in enumerate(queries):
        try:
            texts.append(normalize_query(query, rules))
        except QueryRefused as exc:
            raise Refused(400, f"query {i}: {exc.reason}") from None
    return texts, k


# defined above the deployment: Serve pickles the class (by value) when the decorator runs
def answer_calls(snap: Snapshot, calls: list[tuple[str, int]], beam_size: int) -> list[tuple[Snapshot, list[dict]]]:
    """(snapshot answered from, items) for each (query, k) of one batch, searched once per beam width: a query's
    answer must not depend on what another client asked (a k above the beam widens it, and a wider
    beam changes which candidates are verified)."""
    out: list = [None] * len(calls)
    for beam in sorted({max(beam_size, k) for _, k in calls}):
        group = [j for j, (_, k) in enumerate(calls) if max(beam_size, k) == beam]
        rows, scores = snap.retriever.search_batch([calls[j][0] for j in group], max(calls[j][1] for j in group),
                                                   beam)
        for j, r, s in zip(group, rows, scores):
            want = calls[j][1]
            out[j] = (snap, [{"item_id": str(snap.table.item_ids[i]), "score": float(v)}
                                     for i, v in zip(r[:want], s[:want]) if i >= 0])
    return out


@serve.deployment(name="cart-search")
@serve.ingress(api)
class CartSearch:
    def __init__(self, store_url: str, beam_size: int = 20, device: str = "cpu", poll_s: float = 2.0,
                 max_batch_size: int = 32, batch_wait_s: float = 0.01, limits: dict | None = None,
                 token_sha256: str | None = None):
        limits = limits or {}
        self.rules = QueryConfig(**limits.get("queries", {}))
        self.serve_cfg = ServeConfig(**limits.get("serve", {}))
        env_token = os.environ.get(self.serve_cfg.token_env)
        self.token = token_sha256 or (token_digest(env_token) if env_token else None)
        self.store = Store(store_url)
        self.device, self.beam, self.poll_s = device, beam_size, poll_s
        self.query = limits.get("verify")  # mode, candidates, neighbour lists: as `cart retrieve` (pipelines/verify.query_time)
        # the committed version looked at, read before resolving: a commit during the load is seen
        seen = self.store.manifest().version
        with newest_servable_held(self.store, "serve") as version:  # a compact meanwhile leaves what it reads
            self.current = Snapshot(version, device, self.query, seen)
        self.search_one.set_max_batch_size(max_batch_size)
        self.search_one.set_batch_wait_timeout_s(batch_wait_s)
        self.poll_failures = self.load_failures = 0
        self.poll_error = self.load_error = ""
        self._swap = threading.Lock()  # the watcher's withdrawals and the loader's switch never interleave
        self._wanted = False  # a commit was seen that the loaded version may not answer for
        self._loading, self._next_load = False, 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="cart-manifest-watch", daemon=True).start()

    @staticmethod
    def _backoff(poll_s: float, failures: int) -> float:
        """Seconds before the next try after `failures` in a row: x2 each, at most 30 s, so a
        store that cannot be read or a version that does not load is not retried every poll."""
        return min(poll_s * 2 ** min(failures, 4), max(poll_s, 30.0))

    def _watch(self) -> None:
        while not self._stop.wait(self._backoff(self.poll_s, self.poll_failures)):
            try:
                self._poll()
                self.poll_failures, self.poll_error = 0, ""
            except Exception as exc:  # keep serving the loaded version; retry next poll
                self.poll_failures += 1
                self.poll_error = f"{type(exc).__name__}: {first_line(exc, 300)}"
                logger.warning("cart serve: cannot read the store (%d in a row): %s", self.poll_failures,
                               self.poll_error)
            if self._wanted and not self._loading and time.monotonic() >= self._next_load:
                self._loading = True
                threading.Thread(target=self._load, name="cart-version-load", daemon=True).start()

    def _poll(self) -> None:
        """A new commit: what it deleted is withdrawn from the loaded version now (a manifest read,
        and the new tombstones when something was deleted: 0.1 s at 1M items); the loader then resolves and
        loads the version that answers for it, which can take minutes at millions of items."""
        with self._swap:
            committed = self.store.manifest()
            if committed.version != self.current.as_of:
                self._wanted = True  # first: a withdrawal that fails still gets the new version loaded
                self.current = self.current.as_of_commit(self.store, committed)

    def _load(self) -> None:
        try:
            resolved_at = self.store.manifest().version  # read before resolving: a later commit is seen
            with newest_servable_held(self.store, "serve") as version:  # a load takes minutes at 1M items
                current = self.current
                relabel = Snapshot.key_of(version) == current.key and not current.withdrawn_at
                fresh = None if relabel else Snapshot(version, self.device, self.query)
                source = version.pinned() if relabel and version.version != current.version else None  # read while held
            with self._swap:
                now, current = self.store.manifest(), self.current
                if fresh is None:  # the same answers, new labels
                    if current.withdrawn_at:  # the watcher withdrew items meanwhile: load in full next time
                        self._wanted = True
                        return
                    fresh = copy.copy(current)
                    if version.version != current.version:
                        fresh.version, fresh.source = version.version, source
                else:
                    # what the watcher withdrew for commits after the one this load resolved: this
                    # version predates those deletes (and any content imported again after them)
                    fresh = fresh.withdrawing({i: c for i, c in current.withdrawn_at.items() if c > resolved_at})
                    logger.info("cart serve: switched to version %s", version.version)
                # deletes committed while it loaded are withdrawn before it answers anything
                self.current = fresh.as_of_commit(self.store, now)  # one reference swap: in-flight batches keep theirs
                self._wanted = now.version != resolved_at
            self.load_failures, self.load_error = 0, ""
        except Exception as exc:  # keep serving the loaded version, with deletes withdrawn; retry later
            self.load_failures += 1
            self.load_error = f"{type(exc).__name__}: {first_line(exc, 300)}"
            self._next_load = time.monotonic() + self._backoff(self.poll_s, self.load_failures)
            logger.warning("cart serve: cannot load the committed version (%d in a row): %s", self.load_failures,
                           self.load_error)
        finally:
            self._loading = False

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token_digest(given.strip()), self.token)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        snap = self.current
        body = {"status": "ok", "version": snap.version, "as_of": snap.as_of, "items": int(snap.table.live.sum())}
        reading = self.poll_failures >= self.load_failures
        failures, what, error = (self.poll_failures, "the store could not be read", self.poll_error) if reading else \
            (self.load_failures, "the newest servable version could not be loaded", self.load_error)
        if failures >= self.serve_cfg.watcher_failures:
            body.update(status="unhealthy", reason=f"{what} {failures} times in a row: {error}")
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            queries, k = parse_search(await read_body(request, self.serve_cfg.max_body_bytes), self.rules)
        except Refused as exc:
            return JSONResponse({"detail": exc.reason}, status_code=exc.status)
        answers = await asyncio.gather(*[self.search_one((q, k)) for q in queries])
        for attempt in range(3):  # a swap between the request's batches: answer from one snapshot
            if len({id(a[0]) for a in answers if not isinstance(a, QueryFailed)}) <= 1:
                break
            if attempt == 2:
                return JSONResponse({"detail": "the index switched versions during the request; retry"},
                                    status_code=503)
            answers = await asyncio.gather(*[self.search_one((q, k)) for q in queries])
        failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, QueryFailed)]
        if failed:
            i, answer = failed[0]
            return JSONResponse({"detail": f"query {i}: search failed ({answer.reason})"}, status_code=500)
        snap = answers[0][0]
        return JSONResponse({"version": snap.version, "as_of": snap.as_of, "results": [
            {"query": q, "items": items} for q, (_, items) in zip(queries, answers)]})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def search_one(self, calls: list[tuple[str, int]]) -> list:
        snap = self.current
        try:
            return await asyncio.to_thread(self._search, snap, calls)
        except Exception:  # one query broke the shared batch: answer the others, fail only its own
            out = []
            for call in calls:
                try:
                    out += await asyncio.to_thread(self._search, snap, [call])
                except Exception as exc:
                    logger.warning("cart serve: a query failed inside the model: %s", exc)
                    out.append(QueryFailed(exc))
            return out

    def _search(self, snap: Snapshot, calls: list[tuple[str, int]]) -> list[tuple[int, list[dict]]]:
        return answer_calls(snap, calls, self.beam)


def build_app(store_url: str, cfg: CartConfig, token: str | None = None):
    from dataclasses import asdict

    device = "cuda" if cfg.jobs.retrieve_num_gpus > 0 else "cpu"
    limits = {"queries": asdict(cfg.queries), "serve": asdict(cfg.serve), "verify": query_time(cfg)}
    return CartSearch.options(
        num_replicas=cfg.jobs.serve_replicas,
        max_ongoing_requests=max(64, 4 * cfg.jobs.serve_max_batch_size),
        ray_actor_options={"num_cpus": cfg.jobs.retrieve_num_cpus, "num_gpus": cfg.jobs.retrieve_num_gpus},
    ).bind(store_url, cfg.eval.beam_size, device, 2.0, cfg.jobs.serve_max_batch_size, cfg.jobs.serve_batch_wait_s,
           limits, token_digest(token) if token else None)


def app_builder(args: dict):
    """Import path for `serve run` / KubeRay RayService: args {"store": URL, "config": YAML path,
    "overrides": ["key=value", ...]}. The token, if any, comes from the `serve.token_env` variable
    (default CART_SERVE_TOKEN) in the replicas' environment, e.g. from a Kubernetes Secret."""
    from cart_core.config import load_config
    from pipelines.data_paths import default_config

    config = args.get("config") or default_config()  # as the CLI
    return build_app(args["store"], load_config(config, args.get("overrides") or []))


def run_serve(store: Store, cfg: CartConfig, host: str = "127.0.0.1", port: int = 8000,
              address: str | None = None, block: bool = True, token_file: str | None = None) -> None:
    from pipelines.runtime import init_ray, log

    token = resolve_token(cfg.serve, token_file)
    if token is None and host not in LOOPBACK:
        raise BadInput(f"--host {host}: refusing to serve beyond this machine without a token; give "
                       f"--token-file or set {cfg.serve.token_env} (and put a TLS proxy in front)")
    if not 1 <= port <= 65535:
        raise BadInput(f"--port must be in [1, 65535], got {port}")
    version = IndexVersion.newest_servable(store)
    verify_settings(version, query=query_time(cfg))  # logs the verify.* settings that differ from the fitted ones
    # fail fast, naming the damaged folder, before starting anything: a replica that cannot load
    # reports only "Deploying application cart failed" (the files only: no item vectors built twice)
    version.ids()
    load_generator(version)
    if has_verifier(version):
        load_verifier_files(version)
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(store.url, cfg, token), name="cart", route_prefix="/")
    auth = "bearer token required on /search" if token else "no token: bound to this machine only"
    log("serve", f"serving {store.url} at http://{host}:{port} (POST /search, GET /healthz; {auth}); Ctrl-C stops")
    while block:
        time.sleep(3600)
