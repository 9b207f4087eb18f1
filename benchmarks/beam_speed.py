"""Batched constrained beam search throughput (queries/s) at several beam sizes and catalog sizes.

The generator's weights do not change its cost, so an untrained generator of the demo's shape is
timed; catalogs are random identifiers of the demo's layout. Two figures per point: decoding only
(encoder states precomputed) and end to end (MiniLM query encoding included).

    python benchmarks/beam_speed.py --out out/bench [--sizes 1000,100000,1000000] [--beams 10,50]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cart_core.generator import Generator, GeneratorConfig
from cart_core.identifiers import build_identifiers
from cart_core.retrieval import GenerativeRetriever
from cart_core.text import TextEncoder

QUERIES = [
    "a black dog is running after a white dog in the snow",
    "two young girls are playing on a swing in the park",
    "a man in a red jacket climbs a rock wall",
    "people walking down a busy city street at night",
]


def random_catalog(n: int, n_clusters: int, codebook: int, levels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    return build_identifiers(ids, rng.integers(0, n_clusters, n), rng.integers(0, codebook, (n, levels)),
                             n_clusters=n_clusters, codebook_size=codebook)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--beams", default="10,50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = TextEncoder()
    texts = (QUERIES * (args.batch // len(QUERIES) + 1))[: args.batch]
    states, mask = encoder.layer_states(texts)
    encode_s = time_call(lambda: encoder.layer_states(texts), args.repeats)
    records = []
    for n in [int(s) for s in args.sizes.split(",")]:
        table = random_catalog(n, n_clusters=256 if n >= 100_000 else 32, codebook=64 if n >= 100_000 else 32, levels=2)
        cfg = GeneratorConfig(vocab_sizes=table.vocab_sizes)
        retriever = GenerativeRetriever(Generator(cfg, text_encoder=encoder), table)
        for beam in [int(b) for b in args.beams.split(",")]:
            decode_s = time_call(lambda: retriever.search_batch_states(states, mask, k=10, beam_size=beam), args.repeats)
            rec = {
                "n": n, "beam_size": beam, "batch": args.batch, "vocab_sizes": table.vocab_sizes,
                "decode_queries_per_s": args.batch / decode_s,
                "end_to_end_queries_per_s": args.batch / (decode_s + encode_s),
            }
            records.append(rec)
            print(json.dumps(rec), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__}
    (out / "beam_speed.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))


if __name__ == "__main__":
    main()
