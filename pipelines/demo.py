"""`cart demo`: the whole method on one machine, on real data, beside its dense baselines.

Flickr8k-976 (CLIP ViT-B/32 features, 5 captions each) by default: identifiers are built, the
generator is trained on captions #0-3 and queried with caption #4 (transductive protocol).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cart_core.config import CartConfig, config_dict, load_config
from cart_core.corpus import Corpus, load_corpus, synthetic_corpus
from cart_core.experiment import dense_baselines, prepare, run_generative, run_hybrid
from pipelines.data_paths import default_dataset, packaged_config
from pipelines.outputs import check_output_folder
from pipelines.report import format_table, plot_recall, write_metrics


def resolve_corpus(data: str | None) -> tuple[Corpus, str]:
    """The corpus to run on and a label for it; generated when no real data is available."""
    if data:
        corpus = load_corpus(data)
        return corpus, Path(data).name
    path = default_dataset()
    if path is not None:
        return load_corpus(path), path.name
    print("note: ../shared/data is absent (set CART_SHARED_DATA to point at it); "
          "running on a GENERATED synthetic corpus instead of real data")
    return synthetic_corpus(n_items=600, dim=64, n_captions=5), "synthetic (generated)"


def demo_config(config: str | None, quick: bool, overrides: list[str]) -> CartConfig:
    name = "demo-quick.yaml" if quick else "demo.yaml"
    return load_config(config or packaged_config(name), overrides)


def run_demo(data: str | None, out: str, *, quick: bool = False, config: str | None = None,
             overrides: list[str] | None = None) -> list[dict]:
    started = time.perf_counter()
    out = check_output_folder(out)  # before the training, not at its end
    cfg = demo_config(config, quick, overrides or [])
    corpus, label = resolve_corpus(data)
    if corpus.caption_index.size and cfg.eval.query_caption_index > int(corpus.caption_index.max()):
        cfg.eval.query_caption_index = int(corpus.caption_index.max())
    print(f"corpus: {label}: {len(corpus)} items, dim {corpus.dim}, {len(corpus.caption_text)} captions; "
          f"query = caption #{cfg.eval.query_caption_index}, the others train")
    prep = prepare(corpus, cfg)
    baselines = dense_baselines(prep)
    run = run_generative(prep, cfg, progress=True)
    hybrid = run_hybrid(prep, run, cfg, progress=True)
    records = [hybrid.records[0], run.record, *baselines, hybrid.records[1]]
    for rec in records:
        rec["dataset"] = label
    out_dir = Path(out)
    write_metrics(records, out_dir)
    plot = plot_recall(records, out_dir / "recall.png", f"{label}, transductive (caption #{cfg.eval.query_caption_index} as query)")
    (out_dir / "run.json").write_text(json.dumps({
        "config": config_dict(cfg), "identifiers": run.index_report,
        "train_history": run.train_history, "corpus_report": corpus.report, "fusion": hybrid.fusion_report,
        "wall_s": time.perf_counter() - started,
    }, indent=2, default=str))
    print()
    print(format_table(records, f"{label}: text -> item retrieval, {len(prep.query_text)} queries"))
    t = run.index_report["timings"]
    print(f"\ntimings: identifiers {run.record['index_s']:.1f}s (k-means {t['kmeans_s']:.1f}s, fine {t['fine_s']:.1f}s), "
          f"generator training {run.record['train_s']:.1f}s, total {time.perf_counter() - started:.0f}s")
    rep = run.index_report
    print(f"identifiers ({cfg.identifiers.source}): vocab {run.table.vocab_sizes}, "
          f"{rep['collisions']['distinct_prefixes']} distinct prefixes, collision rate {rep['collisions']['collision_rate']:.2f}, "
          f"k-means imbalance {rep.get('kmeans', {}).get('imbalance', float('nan')):.2f}, "
          f"RQ-VAE perplexity per level {[round(p, 1) for p in rep.get('rqvae', {}).get('perplexity', [])]}")
    fusion = hybrid.fusion_report
    print(f"hybrid: {cfg.verify.candidates} candidates a query (beam {cfg.eval.beam_size}, expanded to prefix depth "
          f"{cfg.verify.expand_depth}); fusion fitted on {fusion['held_out_queries']} held-out training captions "
          f"(candidate recall {100 * fusion['held_out_candidate_recall']:.1f} %, R@1 {fusion['held_out_R@1']}): "
          + ", ".join(f"{n} {w:+.2f}" for n, w in zip(hybrid.retriever.fusion.names, hybrid.retriever.fusion.weights)))
    print(f"wrote {out_dir / 'metrics.json'}, {plot}, {out_dir / 'run.json'}")
    return records
