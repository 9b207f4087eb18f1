"""The `cart` command line: one verb per Ray job, plus `demo`.

Every job verb takes --store (local path or s3://bucket/prefix), --config, --set key=value and
--address (default: a local Ray started in-process; `auto` inside a cluster or `ray job submit`).
Bad input (`cart_core.errors.BadInput`, and a store that cannot serve) exits 2 with one line naming
the file, row and reason, before Ray starts wherever the check does not need the cluster; a failed
job exits 1 with its innermost error on one line; a commit refused because another job committed a
conflicting change meanwhile exits 3 (rerun the job). An error of ours raised in an actor's
constructor counts as the job's own (Ray keeps only its text: `raised_in_constructor`). `--debug`
shows the traceback instead. SIGTERM is handled like Ctrl-C, so a stopped job removes its
temporary outputs (exit 130 / 143).
"""
from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading

from cart_core.errors import BadInput, first_line, shown
from cart_core.store import CommitConflict, Store, StoreError

class StoreDamaged(RuntimeError):
    """`cart check` found problems (exit 1 after printing them all)."""


JOB_VERBS = ("reindex", "rollback", "compact", "import", "extract", "caption", "quantize", "train", "retrieve", "serve", "evaluate", "versions", "check")


def _job_parser(sub, name: str, help: str, config: bool = True, ray: bool = True) -> argparse.ArgumentParser:
    """A verb's parser: --store always; --config / --set and --address only where the verb uses them."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--store", required=True, help="index store: a local folder or s3://bucket/prefix")
    if config:
        p.add_argument("--config", help="YAML config (default: $CART_CONFIG, else the packaged configs/default.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    if ray:
        p.add_argument("--address", help="Ray cluster: auto, ray://host:10001, host:6379 (default: local Ray)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cart", description="CART generative cross-modal retrieval on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole method on real data on this machine")
    demo.add_argument("--data", help="folder with items.parquet + captions.parquet (default: Flickr8k from ../shared/data)")
    demo.add_argument("--out", default="out/demo", help="output folder for metrics.json and the plot")
    demo.add_argument("--quick", action="store_true", help="smaller model and fewer epochs (<= 3 minutes)")
    demo.add_argument("--config", help="YAML config (default: configs/demo.yaml or demo-quick.yaml)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.epochs=5")
    demo.add_argument("--debug", action="store_true")

    p = sub.add_parser("config", help="print the effective config (defaults, --config file, --set overrides)")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", help="YAML config (default: $CART_CONFIG, else the packaged configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("scan", help="list a folder of media files (local or s3://) as a media table for extract")
    p.add_argument("--media-dir", required=True, help="folder of images / videos / audio files")
    p.add_argument("--out", required=True, help="media.parquet to write: item_id, uri, modality")
    p.add_argument("--debug", action="store_true")

    p = _job_parser(sub, "import", "bring your own features (+ captions) into the store", config=False, ray=False)
    p.add_argument("--items", required=True, help="items.parquet: item_id, embedding [, modality]")
    p.add_argument("--captions", help="captions.parquet: item_id, caption [, caption_index]")
    p.add_argument("--holdout-caption-index", type=int,
                   help="hold captions with this index out as evaluation queries (eval/ in the store)")
    p = _job_parser(sub, "extract", "decode media and embed it (Ray Data; CLIP for images/video, CLAP for audio)")
    p.add_argument("--media", required=True, help="media.parquet: item_id, uri [, modality]")
    _job_parser(sub, "caption", "pseudo-queries for candidates from an image-to-text model")
    p = _job_parser(sub, "quantize", "K-Means + RQ-VAE identifiers for every item (Ray Data)")
    p.add_argument("--refit", action="store_true",
                   help="fit new codebooks even when the identifiers already cover every live item (after a "
                        "REFIT DUE drift report); the old version serves until `cart train` commits a generator")
    p = _job_parser(sub, "reindex", "add / update / delete items in a live index (frozen codebooks)")
    p.add_argument("--add", help="items.parquet of new items")
    p.add_argument("--update", help="items.parquet with new features for existing item_ids")
    p.add_argument("--captions", help="captions.parquet for added / updated / existing items")
    p.add_argument("--delete", help="item_ids to delete: a text file (one per line) or a Parquet item_id column")
    tune = p.add_mutually_exclusive_group()
    tune.add_argument("--finetune", action="store_true",
                      help="also fine-tune the generator on the pending items (default: reindex.finetune)")
    tune.add_argument("--no-finetune", action="store_true", help="commit identifiers only; fine-tune later")
    p = _job_parser(sub, "rollback", "make an earlier committed version the current one", config=False, ray=False)
    p.add_argument("version", type=int)
    p = _job_parser(sub, "compact", "reclaim storage of deleted items and of versions older than the last N", ray=False)
    p.add_argument("--keep", type=int, help="versions to keep (default: reindex.keep_versions)")
    p = _job_parser(sub, "train", "train the generator (Ray Train)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default: jobs.train_workers)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run from its last checkpoint")
    p = _job_parser(sub, "retrieve", "batch offline retrieval (Ray Data)")
    p.add_argument("--queries", required=True, help="queries.parquet: query_id, text")
    p.add_argument("--out", required=True, help="results.parquet: query_id, rank, item_id, score")
    p.add_argument("--k", type=int, help="results per query (default: eval.k)")
    p = _job_parser(sub, "serve", "online retrieval over HTTP (Ray Serve)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); any other needs a token (--token-file or "
                        "serve.token_env)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file holding the bearer token clients must send "
                                        "(Authorization: Bearer <token>)")
    p = _job_parser(sub, "evaluate", "R@K / MdR / MRR beside the faiss baseline")
    p.add_argument("--queries", help="queries.parquet: query_id, text, item_id (default: the store's held-out captions)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and recall.png")
    p.add_argument("--k", type=int, help="results per query (default: eval.k)")
    _job_parser(sub, "versions", "list the committed versions of the store", config=False, ray=False)
    p = _job_parser(sub, "check", "verify the store: the current manifest and every file it names, orphans of killed jobs",
                    config=False, ray=False)
    p.add_argument("--repair", action="store_true",
                   help="restore manifest.json from the newest intact manifests/v*.json")
    return parser


def _config(args):
    from cart_core.config import load_config
    from pipelines.data_paths import default_config

    return load_config(args.config or default_config(), args.overrides)


def run_command(args) -> None:
    from cart_core.store import Store

    if args.command == "demo":
        from pipelines.demo import run_demo

        run_demo(args.data, args.out, quick=args.quick, config=args.config, overrides=args.overrides)
        return
    if args.command == "config":
        import yaml

        from cart_core.config import config_dict

        print(yaml.safe_dump(config_dict(_config(args)), sort_keys=False), end="")
        return
    if args.command == "scan":
        from pipelines.scan import scan_media

        scan_media(args.media_dir, args.out)
        return
    store = Store(args.store)
    cfg = _config(args) if hasattr(args, "overrides") else None
    if args.command == "import":
        from pipelines.importer import run_import

        run_import(store, args.items, args.captions, holdout_caption_index=args.holdout_caption_index)
    elif args.command == "extract":
        from pipelines.extract import run_extract

        run_extract(store, args.media, cfg, args.address)
    elif args.command == "caption":
        from pipelines.caption import run_caption

        run_caption(store, cfg, args.address)
    elif args.command == "quantize":
        from pipelines.quantize import run_quantize

        run_quantize(store, cfg, args.address, refit=args.refit)
    elif args.command == "reindex":
        from pipelines.reindex import run_reindex

        if not (args.add or args.update or args.delete or args.captions or args.finetune):
            raise BadInput("nothing to do: give --add, --update, --delete, --captions and/or --finetune")
        run_reindex(store, cfg, add=args.add, captions=args.captions, delete=args.delete, update=args.update,
                    finetune=False if args.no_finetune else (True if args.finetune else None),
                    address=args.address)
    elif args.command == "rollback":
        from pipelines.maintenance import run_rollback

        run_rollback(store, args.version)
    elif args.command == "compact":
        from pipelines.maintenance import run_compact

        run_compact(store, cfg.reindex.keep_versions if args.keep is None else args.keep)
    elif args.command == "train":
        from pipelines.train import run_train

        if args.workers is not None and args.workers < 1:
            raise BadInput(f"--workers must be at least 1, got {args.workers}")
        run_train(store, cfg, workers=args.workers, resume=args.resume, address=args.address)
    elif args.command == "retrieve":
        from pipelines.retrieve import run_retrieve

        run_retrieve(store, args.queries, args.out, cfg, k=answers_per_query(args.k, cfg),
                     address=args.address)
    elif args.command == "serve":
        from pipelines.serve import run_serve

        run_serve(store, cfg, host=args.host, port=args.port, address=args.address, token_file=args.token_file)
    elif args.command == "evaluate":
        from pipelines.evaluate import run_evaluate

        run_evaluate(store, args.queries, args.out, cfg, k=answers_per_query(args.k, cfg),
                     address=args.address)
    elif args.command == "check":
        from pipelines.check import run_check

        report = run_check(store, repair=args.repair)
        if report["problems"]:
            raise StoreDamaged(f"{store.url}: {len(report['problems'])} problem(s); first: {report['problems'][0]}")
    elif args.command == "versions":
        print_versions(store)


def print_versions(store: Store) -> None:
    """Every committed version (* the current one), then which version answers queries and what
    it withdraws: after a takedown during a refit the operator sees that the delete is in force."""
    from cart_core.index_version import IndexVersion

    current = store.manifest().version
    for m in store.versions():
        mark = "*" if m.version == current else " "
        print(f"{mark} v{m.version:<4d} {m.message}  ids={m.ids} generator={m.generator}")
    try:
        served = IndexVersion.newest_servable(store)
    except StoreError as exc:
        print(f"answering: none ({first_line(exc)})")
        return
    line = f"answering: v{served.version}"
    if served.version != current:
        line += f" (v{current} has no generator for its identifiers yet)"
    if served.withdrawn:
        shown_ids = ", ".join(shown(i) for i in sorted(served.withdrawn)[:5]) + (", ..." if len(served.withdrawn) > 5
                                                                                 else "")
        line += f"; {len(served.withdrawn)} items deleted since are withdrawn from its answers ({shown_ids})"
    print(line)


def answers_per_query(k: int | None, cfg) -> int:
    """--k, or the config's eval.k when it is not given (refused there naming eval.k, which the
    user set in a file, when it is more than queries.max_k allows)."""
    if k is not None:
        return k
    if cfg.eval.k > cfg.queries.max_k:
        from cart_core.errors import ConfigError

        raise ConfigError(f"eval.k: {cfg.eval.k} is more than queries.max_k = {cfg.queries.max_k}, the most answers "
                          "a query may ask for; lower eval.k, raise queries.max_k or give --k")
    return cfg.eval.k


def innermost(exc: BaseException) -> BaseException:
    """The error a Ray task, actor or Ray Train worker raised, unwrapped from Ray's own exception
    types (a training whose workers failed reports its lowest rank's error)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
        elif isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause
        else:
            break
    return raised_in_constructor(exc)


# the last line of a traceback: `<module>.<Class>: <message>`, for a module of this project
_RAISED_LINE = re.compile(r"^((?:cart_core|pipelines)(?:\.\w+)+)\.(\w+): (.+)$")


def raised_in_constructor(exc: BaseException) -> BaseException:
    """Our error, where an actor's constructor raised it; `exc` otherwise.

    Ray reports an actor whose `__init__` raised as `ActorDiedError`, which keeps the traceback's
    text but not the exception (Ray Data's actor pools, Serve replicas and our own actors alike).
    An actor that finds a damaged store file or a bad setting while loading would otherwise exit 1
    with Ray's banner. The error is rebuilt, with its message, from the exception line that ends
    the traceback (the outermost one, when exceptions were chained), when it is of this project's
    modules: exit code and message are then those of the job raising it itself.
    """
    if not getattr(exc, "actor_init_failed", False):
        return exc
    found = _RAISED_LINE.match(final_exception_line(str(exc)))
    if not found:
        return exc
    try:
        cls = getattr(importlib.import_module(found[1]), found[2], None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            return exc
        try:
            return cls(found[3])
        except Exception:  # a constructor that takes other arguments than the message (LocatedError)
            rebuilt = Exception.__new__(cls)
            Exception.__init__(rebuilt, found[3])
            return rebuilt
    except Exception:  # never fail while reporting a failure
        return exc


_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def final_exception_line(text: str) -> str:
    """`<type>: <message>` of a traceback's text: in its last part (after the last "The above
    exception…" of a chain), the first line after the part's last `File "..."` frame that is not
    indented (source and caret lines are). "" when that part shows no frame: Ray leaves out its own
    frames, and the frame before would belong to the cause."""
    lines = text.splitlines()
    start = max((i for i, line in enumerate(lines) if line.strip().startswith(_CHAINED)), default=-1) + 1
    frames = [i for i in range(start, len(lines)) if lines[i].lstrip().startswith('File "')]
    if not frames:
        return ""
    return next((line.strip() for line in lines[frames[-1] + 1:] if line.strip() and not line[:1].isspace()), "")


def one_line(exc: BaseException) -> str:
    """A message on one line: ours as written (they name file, row, reason); a library's first
    non-empty line, or its cause's when it has none."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if isinstance(exc, BadInput) or len(lines) < 2 else lines[-1]) if lines else type(exc).__name__


def exit_code(exc: BaseException) -> tuple[int, str]:
    """(exit code, label) of a failure: 3 conflict, 2 bad input, 1 anything else."""
    if isinstance(exc, CommitConflict):
        return 3, "conflict"
    if isinstance(exc, (BadInput, StoreError)):
        return 2, "error"
    return 1, "failed"


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # cleanup runs on `kill` as on Ctrl-C
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        cause = innermost(exc)
        code, label = exit_code(cause)
        kind = "" if code != 1 else f"{type(cause).__name__}: "
        print(f"cart {args.command}: {label}: {kind}{one_line(cause)}", file=sys.stderr)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
