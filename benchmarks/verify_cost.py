"""What verification costs on top of beam search alone (issue 10: at most 1.3 x at beam 20), timed
as alternating repeated passes so that the machine's drift falls on both sides.

quality.py times each retriever once, the generative pass first, minutes apart, on a 2-vCPU box
whose speed moves by 10-35 % between passes (on 2026-12-06 quality.py's single VATEX passes read
1.33 x; two back-to-back pairs of passes in a profiling run the same hour read 1.18 x and 1.13 x).
Here the same generator and hybrid answer the same evaluation queries `--repeats` times,
in alternating order, and the medians are compared; each hybrid pass is also split into
generation (query encoding, beam, prefix expansion: `VerifiedRetriever.candidates`) and
verification (signals, fusion, ranking: the rest).

The generator is trained for `--epochs` (default 2): beam search and verification do the same work
whatever the weights (a fixed beam, a fixed number of decoding steps, the candidate cap), so
training longer does not change the cost being measured; quality.py's rows give the fully trained
figure for comparison.

    python benchmarks/verify_cost.py --out out/bench [--datasets flickr8k-clip-vitb32,vatex-videomae-base]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import QUERY_CAPTION, dataset_folder  # noqa: E402
from scale import machine  # noqa: E402

from cart_core.config import CartConfig, load_config  # noqa: E402
from cart_core.corpus import Corpus, load_corpus  # noqa: E402
from cart_core.experiment import fit_verified, prepare, run_generative  # noqa: E402
from cart_core.retrieval import GenerativeRetriever  # noqa: E402

TARGET = 1.3  # issue 10: verification at most 1.3 x the latency of beam search alone at beam 20


def timed_pass(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def measure(corpus: Corpus, cfg: CartConfig, repeats: int, progress: bool = True) -> dict:
    """Median seconds of `repeats` alternating passes over the evaluation queries: beam search alone,
    the hybrid, and the hybrid's generation half."""
    prep = prepare(corpus, cfg)
    run = run_generative(prep, cfg, progress=progress)
    hybrid = fit_verified(run.generator, run.table, prep.train_text, prep.train_item, prep.train_vec, run.holdout,
                          prep.corpus.embeddings, cfg, progress=progress)
    beam_only = GenerativeRetriever(run.generator, run.table)
    queries, k, beam, batch = prep.query_text, cfg.eval.k, cfg.eval.beam_size, cfg.eval.batch_size
    passes = {
        "beam_only": lambda: beam_only.search(queries, k=k, beam_size=beam, batch_size=batch, progress=False),
        "hybrid": lambda: hybrid.search(queries, k=k, beam_size=beam, batch_size=batch, progress=False),
        "hybrid_generation": lambda: [hybrid.candidates(b, beam) for b in batches(queries, batch)],
    }
    for fn in passes.values():  # warm-up: first-call allocations fall on neither side
        fn()
    seconds: dict[str, list[float]] = {label: [] for label in passes}
    order = list(passes)
    # the bar advances between passes, outside the timed calls (which run without bars)
    with tqdm(total=repeats * len(order), desc="timed passes", disable=not progress) as bar:
        for rep in range(repeats):
            for label in (order if rep % 2 == 0 else order[::-1]):
                seconds[label].append(timed_pass(passes[label]))
                bar.update()
    median = {label: statistics.median(s) for label, s in seconds.items()}
    verification_s = max(median["hybrid"] - median["hybrid_generation"], 0.0)
    ratio = median["hybrid"] / median["beam_only"]
    return {
        "queries": len(queries), "beam_size": beam, "candidates": cfg.verify.candidates,
        "train_epochs": cfg.train.epochs, "repeats": repeats, "seconds": seconds,
        "queries_per_s": {label: len(queries) / s for label, s in median.items()},
        "verification_s_per_1k_queries": 1000 * verification_s / len(queries),
        "latency_ratio_hybrid_to_beam_only": ratio,
        "per_pass_ratios": [h / g for h, g in zip(seconds["hybrid"], seconds["beam_only"])],
        "target": TARGET, "met": bool(ratio <= TARGET),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", default="flickr8k-clip-vitb32,vatex-videomae-base")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        cfg = load_config(args.config, [f"eval.query_caption_index={QUERY_CAPTION.get(name, 4)}",
                                        f"train.epochs={args.epochs}"])
        row = {"dataset": name, **measure(load_corpus(dataset_folder(name)), cfg, args.repeats)}
        rows.append(row)
        qps = row["queries_per_s"]
        print(f"{name}: beam only {qps['beam_only']:.1f} q/s, hybrid {qps['hybrid']:.1f} q/s "
              f"({row['latency_ratio_hybrid_to_beam_only']:.2f} x; target <= {TARGET}), verification "
              f"{row['verification_s_per_1k_queries']:.2f} s per 1k queries", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"rows": rows, "machine": machine(), "commit": commit, "config": args.config,
              "date": time.strftime("%Y-%m-%d")}
    (out / "verify_cost.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'verify_cost.json'}")


if __name__ == "__main__":
    main()
