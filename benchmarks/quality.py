"""Retrieval quality on the real data in ../shared/data, generative beside dense baselines.

Transductive protocol (DESIGN.md §5): caption #q of every candidate is the query (Flickr8k: #4,
VATEX: #9), the others train. Rows: generative (config as given), its ablations (Flickr8k), the
caption centroid, MiniLM -> feature-space ridge + faiss flat search, and the two dense scores
summed (`--dense-only` recomputes just the dense rows).

Inductive protocol (DESIGN.md §5, `--protocols inductive`, Flickr8k and VATEX by default): a seeded
block of items (`--holdout`, 20.5 % = 200 Flickr8k images) is never trained on -- none of their captions is a training query or
enters any centroid -- and every item is indexed from its features alone (identifiers.source =
features). Queries are all captions of the held-out items, searched over the whole catalog and
over the held-out items alone; caption #q of the other items is searched in the same run as the
seen-item reference. Dense baseline: the MiniLM -> feature ridge fitted on seen items only (the
caption centroid cannot serve items without captions).

The paper's reported CART rows are appended to quality.json marked `"reported": true,
"data": "other"` (other data, features and encoders: never compare them as measured here).

    python benchmarks/quality.py --out out/bench [--datasets flickr8k-clip-vitb32,vatex-videomae-base]
                                 [--config configs/demo.yaml] [--no-ablations] [--set key=value ...]
                                 [--protocols transductive,inductive] [--holdout 0.205] [--append]

`--append` merges the rows of this run into an existing DIR/quality.json (same dataset, method,
protocol and catalog replaced), e.g. to add the inductive rows without rerunning the rest.
Exits non-zero when a dataset is missing instead of reporting zeros.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cart_core.config import CartConfig, load_config  # noqa: E402
from cart_core.corpus import Corpus, load_corpus  # noqa: E402
from cart_core.dense import FlatIndex, apply_ridge, fit_ridge  # noqa: E402
from cart_core.experiment import (  # noqa: E402
    dense_baselines,
    fit_verified,
    init_prototypes,
    prepare,
    run_generative,
    run_hybrid,
)
from cart_core.caption_predictor import fit_caption_predictor  # noqa: E402
from cart_core.fusion import Fusion, equal_weights  # noqa: E402
from cart_core.hybrid import VerifiedRetriever, fit_verification, holdout_mask  # noqa: E402
from cart_core.generator import Generator  # noqa: E402
from cart_core.identifiers import IdentifierTable  # noqa: E402
from cart_core.indexing import build_index, identifier_inputs  # noqa: E402
from cart_core.metrics import retrieval_metrics  # noqa: E402
from cart_core.retrieval import GenerativeRetriever  # noqa: E402
from cart_core.text import TextEncoder  # noqa: E402
from cart_core.verify import caption_sums, dense_scores  # noqa: E402
from cart_core.training import train_generator  # noqa: E402
from pipelines.data_paths import shared_data_dir  # noqa: E402
from pipelines.report import format_table, plot_recall  # noqa: E402

QUERY_CAPTION = {"flickr8k-clip-vitb32": 4, "vatex-videomae-base": 9}
ABLATIONS = {
    "no_fusion": ["generator.coarse_fusion=false", "generator.fine_fusion=false"],
    "kmeans_only": ["identifiers.fine=residual_kmeans"],
    "rqvae_only": ["identifiers.coarse=false"],
    "no_rdrop": ["train.rdrop_weight=0"],
    # what identifiers are built from (the demo config uses "both")
    "ids_from_features": ["identifiers.source=features"],
    "ids_from_captions": ["identifiers.source=captions"],
}

# CART as reported by Fang et al. (ACL 2025): other data (full Flickr30K / MSR-VTT test sets),
# other features (ImageBind) and another encoder-decoder (T5), with generated pseudo-queries.
PAPER_ROWS = [
    {"method": "CART (paper)", "dataset": "msr-vtt", "R@1": 52.6, "R@5": 75.4, "R@10": 84.2},
    {"method": "CART (paper)", "dataset": "flickr30k", "R@1": 81.8, "R@5": 96.1, "R@10": 98.4},
]


def paper_rows() -> list[dict]:
    return [{**row, "protocol": "reported", "reported": True, "data": "other",
             "note": "as reported in the paper: other data, features (ImageBind) and encoder (T5); not measured here"}
            for row in PAPER_ROWS]


def dataset_folder(name: str) -> Path:
    folder = shared_data_dir() / name
    if not (folder / "items.parquet").exists():
        raise SystemExit(f"quality: dataset {folder} is missing (set CART_SHARED_DATA); refusing to report zeros")
    return folder


def dense_sum(prep) -> dict:
    """caption centroid + ridge + faiss flat: the sum of the two cosines, one exact search over
    the concatenated unit vectors ([q; ridge(q)] . [centroid; feature])."""
    from cart_core.kmeans import l2_normalize

    n = len(prep.corpus)
    ridge = fit_ridge(prep.train_vec, prep.corpus.embeddings[prep.train_item], alpha=0.01)
    index = FlatIndex(np.hstack([l2_normalize(prep.centroids), l2_normalize(prep.corpus.embeddings)]))
    t0 = time.perf_counter()
    queries = np.hstack([l2_normalize(prep.query_vec), l2_normalize(apply_ridge(prep.query_vec, ridge))])
    rows, _ = index.search(queries, n)
    search_qps = len(queries) / max(time.perf_counter() - t0, 1e-9)
    encode_qps = prep.timings["encode_queries_per_s"]
    return {"method": "caption_centroid+faiss_flat_ridge", "protocol": "transductive",
            **retrieval_metrics(rows, prep.query_item), "queries_per_s": 1.0 / (1.0 / search_qps + 1.0 / encode_qps)}


def hybrid_ablation_changes(signals: list[str]) -> dict[str, dict]:
    """label -> verify.* overrides (each refits the verifier on the same generator): each of the
    configured signals left out in turn, the generator's log-probabilities added, no prefix
    expansion, fewer candidates."""
    return {
        "no_prefix_expansion": {"expand_depth": 99},
        **{f"without_{name}": {"signals": [s for s in signals if s != name]} for name in signals},
        "with_generator_logp": {"signals": [*signals, *(s for s in ("gen_item_logp", "gen_cluster_logp")
                                                        if s not in signals)]},
        "candidates_200": {"candidates": 200},
    }


def hybrid_ablation_rows(prep, run, cfg: CartConfig, fitted: VerifiedRetriever) -> list[dict]:
    """One thing changed in the hybrid at a time, the generator unchanged; plus hand-set equal
    weights on the fitted signals."""
    rows = []
    for label, change in hybrid_ablation_changes(list(cfg.verify.signals)).items():
        change = dict(change)
        if "expand_depth" in change:
            change["expand_depth"] = run.table.length
        variant = replace(cfg, verify=replace(cfg.verify, **change))
        rows.append(run_hybrid(prep, run, variant, f"hybrid:{label}", progress=False).records[0])
    equal = VerifiedRetriever(run.generator, run.table, fitted.items, fitted.aligner,
                              equal_weights(fitted.fusion.names), cfg.verify, neighbors=fitted.neighbors)
    rows.append(run_hybrid(prep, run, cfg, "hybrid:equal_weights", progress=False, retriever=equal).records[0])
    return rows


def run_dataset(name: str, config: Path, overrides: list[str], ablations: bool, dense_only: bool = False,
                hybrid_ablations: bool = True) -> list[dict]:
    folder = dataset_folder(name)
    base = [f"eval.query_caption_index={QUERY_CAPTION.get(name, 4)}", *overrides]
    cfg = load_config(config, base)
    corpus = load_corpus(folder)
    prep = prepare(corpus, cfg)
    records = [*dense_baselines(prep), dense_sum(prep)]
    if dense_only:
        for rec in records:
            rec["dataset"] = name
        return records
    run = run_generative(prep, cfg, "generative")
    hybrid = run_hybrid(prep, run, cfg, progress=False)
    records = [hybrid.records[0], run.record, *records, hybrid.records[1]]
    if hybrid_ablations:
        records += hybrid_ablation_rows(prep, run, cfg, hybrid.retriever)
    if ablations:
        for label, extra in ABLATIONS.items():
            records.append(run_generative(prep, load_config(config, base + extra), f"generative:{label}").record)
    for rec in records:
        rec["dataset"] = name
    return records


def holdout_items(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean [n]: the seeded block of items whose captions are never trained on."""
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"quality: --holdout must be in (0, 1), got {fraction}")
    unseen = np.zeros(n, dtype=bool)
    unseen[np.random.default_rng(seed).choice(n, max(1, round(fraction * n)), replace=False)] = True
    return unseen


def _timed(fn, count: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    rows = fn()
    return rows, count / max(time.perf_counter() - t0, 1e-9)


def inductive_rows(corpus: Corpus, cfg: CartConfig, unseen: np.ndarray, progress: bool = True,
                   captionless_shares: tuple[float, ...] = ()) -> list[dict]:
    """Generative and ridge + faiss rows for the inductive protocol (see the module docstring);
    with captionless_shares, the hybrid refitted at each `verify.captionless_query_share` too."""
    q = cfg.eval.query_caption_index
    item_unseen = unseen[corpus.caption_item]
    train_rows = np.flatnonzero(~item_unseen & (corpus.caption_index != q))
    query_sets = {  # name -> (caption rows, catalog rows or None for every item, protocol)
        "unseen items, whole catalog": (np.flatnonzero(item_unseen), None, "inductive"),
        "unseen items, unseen-only catalog": (np.flatnonzero(item_unseen), np.flatnonzero(unseen), "inductive"),
        f"seen items (caption #{q}), whole catalog": (np.flatnonzero(~item_unseen & (corpus.caption_index == q)),
                                                     None, "transductive"),
    }
    texts = corpus.caption_text
    train_item = corpus.caption_item[train_rows]
    train_text = [texts[i] for i in train_rows.tolist()]
    encoder = TextEncoder(cfg.generator.text_encoder, cfg.generator.max_query_tokens)
    train_vec = encoder.sentence_embeddings(train_text)

    # identifiers from the features of every item: the held-out ones have no captions to build from
    id_cfg = replace(cfg.identifiers, source="features")
    t0 = time.perf_counter()
    table, _, _ = build_index(corpus.item_ids, identifier_inputs("features", corpus.embeddings, None), id_cfg,
                              progress=progress)
    index_s = time.perf_counter() - t0
    gen_cfg = replace(cfg.generator, vocab_sizes=list(table.vocab_sizes))
    generator = Generator(gen_cfg, text_encoder=encoder if gen_cfg.query == "text" else None)
    if gen_cfg.output_head == "prototype":  # seen items' centroids only; unseen rows stay zero
        sums = np.zeros((len(corpus), train_vec.shape[1]))
        np.add.at(sums, train_item, train_vec)
        init_prototypes(generator, table, (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12))
                        .astype(np.float32))
    holdout = holdout_mask(len(train_text), cfg.verify.holdout, cfg.train.seed)  # fits the hybrid's fusion
    fit = np.flatnonzero(~holdout)
    history = train_generator(generator, [train_text[i] for i in fit], table.codes[train_item[fit]], cfg.train,
                              progress=progress)
    hybrid = fit_verified(generator, table, train_text, train_item, train_vec, holdout, corpus.embeddings, cfg,
                          progress=progress)
    ridge = fit_ridge(train_vec, corpus.embeddings[train_item], alpha=0.01)

    common = {"identifiers_source": "features", "holdout": float(unseen.mean()), "unseen_items": int(unseen.sum()),
              "train_captions": len(train_rows)}
    records = tradeoff_rows(hybrid, cfg, (train_text, train_item, train_vec, holdout), corpus, query_sets,
                            captionless_shares, common)
    for label, (rows, catalog, protocol) in query_sets.items():
        query_text = [texts[i] for i in rows.tolist()]
        gold = corpus.caption_item[rows]
        live = np.ones(len(corpus), dtype=bool) if catalog is None else np.isin(np.arange(len(corpus)), catalog)
        scope = IdentifierTable(table.item_ids, table.codes, table.vocab_sizes, live)
        retriever = GenerativeRetriever(generator, scope)
        found, qps = _timed(lambda: retriever.search(query_text, k=cfg.eval.k, beam_size=cfg.eval.beam_size,
                                                     batch_size=cfg.eval.batch_size)[0], len(rows))
        extra = {**common, "catalog": label, "catalog_items": int(live.sum())}
        records.append({"method": "generative", "protocol": protocol, **retrieval_metrics(found, gold),
                        "queries_per_s": qps, "index_s": index_s, "train_s": history["train_s"],
                        "beam_size": cfg.eval.beam_size, "generator_pairs": int(len(fit)), **extra})
        verified = VerifiedRetriever(generator, scope, hybrid.items, hybrid.aligner, hybrid.fusion, cfg.verify,
                                     neighbors=hybrid.neighbors)
        found, qps = _timed(lambda: verified.search(query_text, k=cfg.eval.k, beam_size=cfg.eval.beam_size,
                                                    batch_size=cfg.eval.batch_size)[0], len(rows))
        records.append({"method": "hybrid (generate + verify)", "protocol": protocol,
                        **retrieval_metrics(found, gold), "queries_per_s": qps, "signals": hybrid.fusion.names,
                        "weights": [round(w, 3) for w in hybrid.fusion.weights],
                        "captionless_share": hybrid.fusion.report.get("captionless_share"), **extra})
        # the hybrid's dense signals and weights over every catalog item: the stronger dense baseline
        cat = np.arange(len(corpus)) if catalog is None else catalog
        def dense_fused(query_text=query_text, cat=cat):
            score = dense_scores(encoder.sentence_embeddings(query_text), hybrid.items, hybrid.aligner,
                                 hybrid.fusion.names, hybrid.fusion.weights, rows=cat, query_texts=query_text)
            return cat[np.argsort(-score, axis=1)[:, :10]]
        found, qps = _timed(dense_fused, len(rows))
        records.append({"method": "dense: hybrid's signals and weights, all items", "protocol": protocol,
                        **retrieval_metrics(found, gold), "queries_per_s": qps, **extra})
        # dense: encode + ridge + exact search over the same catalog (every catalog item ranked)
        cat_rows = np.arange(len(corpus)) if catalog is None else catalog
        index = FlatIndex(corpus.embeddings[cat_rows])

        def dense(query_text=query_text, index=index, cat_rows=cat_rows):
            vec = apply_ridge(encoder.sentence_embeddings(query_text), ridge)
            return cat_rows[index.search(vec, len(cat_rows))[0]]

        found, qps = _timed(dense, len(rows))
        records.append({"method": "faiss_flat_ridge", "protocol": protocol, **retrieval_metrics(found, gold),
                        "queries_per_s": qps, **extra})
    return records


def tradeoff_rows(hybrid: VerifiedRetriever, cfg: CartConfig, training, corpus: Corpus, query_sets: dict,
                  shares: tuple[float, ...], common: dict) -> list[dict]:
    """The hybrid's fusion refitted on the same held-out slice at each captionless_query_share
    (same generator, aligner and candidates), scored on the unseen and seen queries over the whole
    catalog: how findable items without captions are against captioned ones, per setting."""
    train_text, train_item, train_vec, holdout = training
    held = np.flatnonzero(holdout)
    sums = caption_sums(train_item, train_vec, len(corpus))
    loo = sums[train_item[held]] - train_vec[held]
    crossfit = fit_caption_predictor(corpus.embeddings, sums, cfg.verify.caption_predictor)[1] \
        if hybrid.items.predictor is not None else None
    records = []
    for share in shares:
        verify_cfg = replace(cfg.verify, captionless_query_share=share, captioned_cost=None)
        refit = VerifiedRetriever(hybrid.generator, hybrid.table, hybrid.items, hybrid.aligner, Fusion([], []),
                                  verify_cfg, neighbors=hybrid.neighbors)
        refit.fusion = fit_verification(refit, [train_text[i] for i in held], train_item[held], loo,
                                        cfg.eval.beam_size, cfg.eval.batch_size, crossfit_captions=crossfit)
        for label, (rows, catalog, protocol) in query_sets.items():
            if catalog is not None:
                continue
            found = refit.search([corpus.caption_text[i] for i in rows.tolist()], k=cfg.eval.k,
                                 beam_size=cfg.eval.beam_size, batch_size=cfg.eval.batch_size)[0]
            records.append({"method": f"hybrid, captionless_query_share={share}", "protocol": protocol,
                            **retrieval_metrics(found, corpus.caption_item[rows]), "captionless_query_share": share,
                            "weights": [round(w, 3) for w in refit.fusion.weights], "signals": refit.fusion.names,
                            **common, "catalog": label, "catalog_items": len(corpus)})
    return records


def default_label(verify) -> str:
    """How the configured hybrid sets its captionless share, for the trade-off plot's legend."""
    if verify.captioned_cost is not None:
        return f"captioned_cost {verify.captioned_cost:g}"
    return f"share {verify.captionless_query_share}"


def plot_tradeoff(rows: list[dict], path: Path, title: str, hybrid_share: str | None = None) -> Path | None:
    """Seen items' recall against unseen items' recall (whole catalog; R@1 and R@10 panels) for
    each captionless_query_share, the default hybrid and the dense baselines: where on the
    trade-off each setting sits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(method: str, metric: str):
        """(seen, unseen) recall over the whole catalog, or None."""
        got = {r["catalog"].split(" ")[0]: r[metric] for r in rows
               if r["method"] == method and r["catalog"].endswith("whole catalog")}
        return (got["seen"], got["unseen"]) if {"seen", "unseen"} <= got.keys() else None

    shares = list(dict.fromkeys(r["captionless_query_share"] for r in rows if "captionless_query_share" in r))
    if not shares:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("R@1", "R@10")):
        curve = [(str(s), point(f"hybrid, captionless_query_share={s}", metric)) for s in shares]
        default = point("hybrid (generate + verify)", metric)
        curve = sorted([(s, p) for s, p in curve if p is not None]
                       + ([(f"default ({hybrid_share})", default)] if default else []),
                       key=lambda sp: sp[1][0], reverse=True)
        ax.plot([p[0] for _, p in curve], [p[1] for _, p in curve], "o-", label="hybrid, by captionless_query_share")
        for s, (x, y) in curve:
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for method, marker in (("faiss_flat_ridge", "s"), ("dense: hybrid's signals and weights, all items", "^")):
            p = point(method, metric)
            if p:
                ax.plot(*p, marker, label=method)
        ax.set_xlabel(f"seen items (captions trained on): {metric}, whole catalog")
        ax.set_ylabel(f"unseen items (no captions): {metric}, whole catalog")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_inductive(name: str, config: Path, overrides: list[str], holdout: float, seed: int,
                  captionless_shares: tuple[float, ...] = ()) -> list[dict]:
    folder = dataset_folder(name)
    cfg = load_config(config, [f"eval.query_caption_index={QUERY_CAPTION.get(name, 4)}", *overrides])
    corpus = load_corpus(folder)
    records = inductive_rows(corpus, cfg, holdout_items(len(corpus), holdout, seed),
                             captionless_shares=captionless_shares)
    for rec in records:
        rec["dataset"] = name
    return records


def row_key(rec: dict) -> tuple:
    return rec.get("dataset"), rec.get("method"), rec.get("protocol"), rec.get("catalog")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of `old` not replaced by a row of `new` with the same key, then `new`."""
    keys = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in keys] + new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", default="flickr8k-clip-vitb32,vatex-videomae-base")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--no-ablations", action="store_true", help="skip the generator ablation rows (retrains)")
    parser.add_argument("--no-hybrid-ablations", action="store_true",
                        help="skip the hybrid ablation rows (same generator, refitted verification)")
    parser.add_argument("--dense-only", action="store_true",
                        help="transductive: only the dense rows (caption centroid, ridge, their sum); with --append")
    parser.add_argument("--ablation-datasets", default="flickr8k-clip-vitb32")
    parser.add_argument("--protocols", default="transductive,inductive",
                        help="transductive and/or inductive (comma-separated)")
    parser.add_argument("--inductive-datasets", default="flickr8k-clip-vitb32,vatex-videomae-base")
    parser.add_argument("--holdout", type=float, default=0.205,
                        help="inductive: share of items never trained on (0.205: 200 of Flickr8k's 976)")
    parser.add_argument("--holdout-seed", type=int, default=0)
    parser.add_argument("--captionless-shares", default="none,0.3,0.5",
                        help="inductive: also refit the hybrid at these verify.captionless_query_share values "
                             "(comma-separated, 'none' for the slice's own share; empty: no refits) and plot "
                             "the trade-off")
    parser.add_argument("--append", action="store_true", help="merge into an existing DIR/quality.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or set(protocols) - {"transductive", "inductive"}:
        parser.error(f"--protocols must list transductive and/or inductive, got {args.protocols!r}")
    if not 0.0 < args.holdout < 1.0:
        parser.error(f"--holdout must be in (0, 1), got {args.holdout}")
    try:
        shares = tuple(None if x.strip().lower() == "none" else float(x)
                       for x in args.captionless_shares.split(",") if x.strip())
    except ValueError:
        parser.error(f"--captionless-shares must be comma-separated numbers or none, got {args.captionless_shares!r}")
    if any(x is not None and not 0 <= x <= 1 for x in shares):
        parser.error(f"--captionless-shares must lie in [0, 1], got {args.captionless_shares!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "quality.json").read_text()) if args.append and (out / "quality.json").exists() else []
    started, records = time.perf_counter(), []

    def save() -> None:
        (out / "quality.json").write_text(json.dumps(merge(previous, records + paper_rows()), indent=2))

    for name in args.datasets.split(","):
        if "transductive" in protocols:
            with_ablations = not args.no_ablations and name in args.ablation_datasets.split(",")
            rows = run_dataset(name, Path(args.config), args.overrides, with_ablations, args.dense_only,
                               not args.no_hybrid_ablations and name in args.ablation_datasets.split(","))
            records += rows
            print(format_table(rows, f"\n{name} (transductive)"), flush=True)
            if not args.dense_only:  # the figure shows the generative rows beside the dense ones
                plot_recall(rows, out / f"quality-{name}.png", f"{name}, transductive")
            save()
        if "inductive" in protocols and name in args.inductive_datasets.split(","):
            rows = run_inductive(name, Path(args.config), args.overrides, args.holdout, args.holdout_seed, shares)
            records += rows
            plot_tradeoff(rows, out / f"quality-{name}-captionless-tradeoff.png",
                          f"{name}, inductive: items without captions against captioned ones",
                          default_label(load_config(Path(args.config), args.overrides).verify))
            rows = [r for r in rows if "captionless_query_share" not in r]
            for catalog in dict.fromkeys(r["catalog"] for r in rows):
                print(format_table([r for r in rows if r["catalog"] == catalog], f"\n{name}: {catalog}"), flush=True)
            plot_recall([dict(r, method=f"{r['method']} | {r['catalog']}") for r in rows],
                        out / f"quality-{name}-inductive.png",
                        f"{name}, inductive ({100 * args.holdout:.0f} % of items never trained on)")
            save()
    save()
    meta = {"machine": f"{platform.machine()} {platform.processor()}", "config": args.config,
            "overrides": args.overrides, "protocols": protocols, "holdout": args.holdout,
            "holdout_seed": args.holdout_seed, "captionless_shares": args.captionless_shares,
            "datasets": args.datasets, "wall_s": time.perf_counter() - started}
    meta_path = out / "quality.meta.json"
    if args.append and meta_path.exists():  # keep the record of the run the other rows came from
        first = json.loads(meta_path.read_text())
        appended = first.get("appended", [])
        meta = {**first, "appended": (appended if isinstance(appended, list) else [appended]) + [meta]}
    meta_path.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
