"""Retrieval quality on the real data in ../shared/data, generative beside dense baselines.

Transductive protocol (DESIGN.md §5): caption #q of every candidate is the query (Flickr8k: #4,
VATEX: #9), the others train. Rows: generative (config as given), its ablations (Flickr8k), the
caption centroid and MiniLM -> feature-space ridge + faiss flat search.

    python benchmarks/quality.py --out out/bench [--datasets flickr8k-clip-vitb32,vatex-videomae-base]
                                 [--config configs/demo.yaml] [--no-ablations] [--set key=value ...]

Exits non-zero when a dataset is missing instead of reporting zeros.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cart_core.config import load_config  # noqa: E402
from cart_core.corpus import load_corpus  # noqa: E402
from cart_core.experiment import dense_baselines, prepare, run_generative  # noqa: E402
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


def run_dataset(name: str, config: Path, overrides: list[str], ablations: bool) -> list[dict]:
    folder = shared_data_dir() / name
    if not (folder / "items.parquet").exists():
        raise SystemExit(f"quality: dataset {folder} is missing (set CART_SHARED_DATA); refusing to report zeros")
    base = [f"eval.query_caption_index={QUERY_CAPTION.get(name, 4)}", *overrides]
    cfg = load_config(config, base)
    corpus = load_corpus(folder)
    prep = prepare(corpus, cfg)
    records = [run_generative(prep, cfg, "generative").record, *dense_baselines(prep)]
    if ablations:
        for label, extra in ABLATIONS.items():
            records.append(run_generative(prep, load_config(config, base + extra), f"generative:{label}").record)
    for rec in records:
        rec["dataset"] = name
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", default="flickr8k-clip-vitb32,vatex-videomae-base")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablation rows")
    parser.add_argument("--ablation-datasets", default="flickr8k-clip-vitb32")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, records = time.perf_counter(), []
    for name in args.datasets.split(","):
        with_ablations = not args.no_ablations and name in args.ablation_datasets.split(",")
        rows = run_dataset(name, Path(args.config), args.overrides, with_ablations)
        records += rows
        print(format_table(rows, f"\n{name} (transductive)"), flush=True)
        plot_recall(rows, out / f"quality-{name}.png", f"{name}, transductive")
        (out / "quality.json").write_text(json.dumps(records, indent=2))
    meta = {"machine": f"{platform.machine()} {platform.processor()}", "config": args.config,
            "overrides": args.overrides, "wall_s": time.perf_counter() - started}
    (out / "quality.meta.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
