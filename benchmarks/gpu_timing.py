"""cart_core on an accelerator vs this CPU: generator training steps/s and batched constrained
beam search queries/s over N = 1M identifiers. No Ray, no faiss, no downloaded weights: the
text encoder is all-MiniLM-L6-v2's architecture with random weights (cost does not depend on them)
and only its config + tokenizer files travel.

    python benchmarks/gpu_timing.py --out DIR [--device cuda] [--n 1000000] [--encoder-config DIR]
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
from cart_core.training import TrainConfig, train_generator

CAPTIONS = ["a black dog is running after a white dog in the snow",
            "two young girls are playing on a swing in the park",
            "a man in a red jacket climbs a rock wall",
            "people walking down a busy city street at night"]


class RandomMiniLM:
    """TextEncoder-compatible: MiniLM architecture from its config, random weights."""

    def __init__(self, config_dir: str, device: str):
        from transformers import AutoTokenizer, BertConfig, BertModel

        self.name, self.max_tokens, self.device = "minilm-random", 32, device
        self.tokenizer = AutoTokenizer.from_pretrained(config_dir)
        self.model = BertModel(BertConfig.from_json_file(str(Path(config_dir) / "config.json"))).to(device).eval()
        self.hidden_size = self.model.config.hidden_size
        self.num_layers = self.model.config.num_hidden_layers

    def layer_states(self, texts, *, grad=False):
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=32, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.set_grad_enabled(grad):
            out = self.model(**batch, output_hidden_states=True)
        return torch.stack(out.hidden_states[1:], 1), batch["attention_mask"].bool()

    def top_layer_modules(self, n):
        return list(self.model.encoder.layer)[-n:] if n else []


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def catalog(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    return build_identifiers(ids, rng.integers(0, 256, n), rng.integers(0, 64, (n, 2)),
                             n_clusters=256, codebook_size=64)


def time_training(gen: Generator, table, device: str, pairs: int, batch: int) -> dict:
    texts = [CAPTIONS[i % 4] + f" {i}" for i in range(pairs)]
    codes = table.codes[np.arange(pairs) % len(table.codes)]
    gen.to(device)
    cfg = TrainConfig(epochs=1, batch_size=batch, rdrop_weight=1.0)
    train_generator(gen, texts[: batch * 2], codes[: batch * 2], cfg, progress=False)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    hist = train_generator(gen, texts, codes, cfg, progress=False)
    sync(device)
    wall = time.perf_counter() - t0
    steps = -(-pairs // batch)
    return {"pairs": pairs, "batch": batch, "steps": steps, "steps_per_s": steps / hist["train_s"],
            "wall_s_incl_state_cache": wall}


def time_search(gen: Generator, table, device: str, batch: int, beam: int, repeats: int) -> dict:
    retriever = GenerativeRetriever(gen, table, device=device)
    texts = (CAPTIONS * batch)[:batch]
    retriever.search_batch(texts, k=10, beam_size=beam)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        retriever.search_batch(texts, k=10, beam_size=beam)
    sync(device)
    return {"batch": batch, "beam_size": beam, "queries_per_s": batch * repeats / (time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--encoder-config", required=True, help="folder with MiniLM config.json + tokenizer files")
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--search-batches", default="64,512")
    parser.add_argument("--beams", default="10,50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = args.device
    t0 = time.perf_counter()
    table = catalog(args.n)
    build_s = time.perf_counter() - t0
    encoder = RandomMiniLM(args.encoder_config, device)
    gen = Generator(GeneratorConfig(vocab_sizes=table.vocab_sizes), text_encoder=encoder)
    result = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "n_identifiers": args.n, "vocab_sizes": table.vocab_sizes,
        "catalog_build_s": build_s,
        "training": time_training(gen, table, device, args.pairs, args.train_batch),
        "search": [time_search(gen.eval(), table, device, int(b), int(w), args.repeats)
                   for b in args.search_batches.split(",") for w in args.beams.split(",")],
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_timing-{device.split(':')[0]}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
