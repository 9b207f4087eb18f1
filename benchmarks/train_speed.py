"""Does `cart train` with the default config use the machine? Steps/s of Ray Train against the
in-process path `cart demo` takes (cart_core.training.train_generator), on the same pairs, in one run.

1. A store is built once (not timed): Flickr8k-976 from ../shared/data (captions #0-3 train,
   #4 held out) or, without it, a generated corpus of the same size; `run_quantize` with the
   config's identifiers.
2. Arms, each on the same training pairs (`pipelines.train.training_pairs`, the same verify
   hold-out), the same model config and `--epochs` epochs:
     ray_default   run_train with the config as given (default.yaml: workers / CPUs sized from Ray)
     ray_1cpu      run_train with jobs.train_workers=1, jobs.cpus_per_worker=1 (the old default)
     in_process    train_generator in this process, torch's own thread count (what `cart demo` does)
   Steps/s = steps per epoch / median epoch time (epochs after the first; encoder caching and
   Ray Train start-up are reported apart, from the job's timings).

    python benchmarks/train_speed.py --out DIR [--epochs 4] [--config configs/default.yaml]

writes DIR/train_speed.json and DIR/train_speed.png; the target (ray_default within 20 % of
in_process) is reported as met or missed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.8   # ray_default steps/s >= 0.8 x in_process

from cart_core.training import steady_epoch_s  # noqa: E402


def build_store(work: Path, cfg) -> tuple[str, str]:
    from cart_core.corpus import synthetic_corpus, write_corpus
    from cart_core.store import Store
    from pipelines.data_paths import default_dataset
    from pipelines.importer import run_import
    from pipelines.quantize import run_quantize

    data = default_dataset()
    label = "flickr8k-clip-vitb32 (976 items)"
    if data is None:
        data = work / "corpus"
        write_corpus(synthetic_corpus(n_items=976, dim=512, n_captions=5, seed=0), data)
        label = "synthetic (generated, 976 items x 5 captions)"
    store = Store(str(work / "store"))
    run_import(store, str(Path(data) / "items.parquet"), str(Path(data) / "captions.parquet"), holdout_caption_index=4)
    run_quantize(store, cfg)
    return store.url, label


def ray_arm(store_url: str, cfg, overrides: list[str], config_path: str) -> dict:
    from cart_core.config import load_config
    from cart_core.store import Store
    from pipelines.train import run_train

    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    summary = run_train(Store(store_url), cfg)
    wall = time.perf_counter() - t0
    step_s = steady_epoch_s(summary["epoch_s"])
    return {"wall_s": round(wall, 2), "train_s": summary["timings"]["train_s"], "epoch_s": summary["epoch_s"],
            "steps_per_epoch": summary["steps_per_epoch"], "steps_per_s": round(summary["steps_per_epoch"] / step_s, 2),
            "workers": summary["workers"], "cpus_per_worker": summary["cpus_per_worker"],
            "torch_threads": summary["torch_threads"], "scaling": summary["scaling"],
            "start_and_cache_s": round(summary["timings"]["train_s"] - sum(summary["epoch_s"]), 2)}


def in_process_arm(store_url: str, cfg) -> dict:
    import numpy as np
    import torch

    from cart_core.generator import Generator
    from cart_core.hybrid import holdout_mask
    from cart_core.store import Store
    from cart_core.training import train_generator
    from pipelines.train import training_pairs

    pairs, info = training_pairs(Store(store_url), cfg)
    keep = ~holdout_mask(len(pairs), cfg.verify.holdout, cfg.train.seed)
    table = pairs.filter(keep)
    texts = [str(t) for t in table.column("text").to_pylist()]
    codes = np.stack([np.asarray(c, np.int64) for c in table.column("codes").to_pylist()])
    weights = np.asarray(table.column("weight").to_pylist(), np.float32)
    generator = Generator(replace(cfg.generator, vocab_sizes=info["vocab_sizes"]))
    t0 = time.perf_counter()
    history = train_generator(generator, texts, codes, cfg.train, progress=False, weights=weights)
    wall = time.perf_counter() - t0
    step_s = steady_epoch_s(history["epoch_s"])
    return {"wall_s": round(wall, 2), "epoch_s": history["epoch_s"], "steps_per_epoch": history["steps_per_epoch"],
            "steps_per_s": round(history["steps_per_epoch"] / step_s, 2), "torch_threads": torch.get_num_threads(),
            "start_and_cache_s": round(wall - sum(history["epoch_s"]), 2), "pairs": int(len(texts))}


def plot(arms: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(names, [arms[n]["steps_per_s"] for n in names], color=["#4c72b0", "#8c8c8c", "#55a868"][:len(names)])
    for bar, n in zip(bars, names):
        ax.annotate(f"{arms[n]['steps_per_s']:.1f}\n{arms[n].get('torch_threads', '?')} thr",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training steps / s (steady)")
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--skip-1cpu", action="store_true", help="leave out the old-default arm")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is left out of the steady rate)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from cart_core.config import load_config
    from pipelines.runtime import init_ray

    base = [f"train.epochs={args.epochs}"]
    cfg = load_config(args.config, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cart-train-speed-") as tmp:
        work = Path(tmp)
        init_ray(None)
        store_url, label = build_store(work, cfg)
        arms = {"ray_default": ray_arm(store_url, cfg, base, args.config)}
        if not args.skip_1cpu:
            # a different config changes the fingerprint, so this trains again instead of "nothing to do"
            arms["ray_1cpu"] = ray_arm(store_url, cfg, base + ["jobs.train_workers=1", "jobs.cpus_per_worker=1",
                                                               "train.seed=1"], args.config)
        cpus = ray.cluster_resources().get("CPU")
        ray.shutdown()
        arms["in_process"] = in_process_arm(store_url, cfg)
    ratio = arms["ray_default"]["steps_per_s"] / arms["in_process"]["steps_per_s"]
    result = {
        "meta": {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                             "ray_cpus": cpus}, "torch": torch.__version__, "ray": ray.__version__,
                 "config": args.config, "epochs": args.epochs, "data": label, "argv": sys.argv[1:]},
        "arms": arms,
        "targets": [{"name": f"cart train default config steps/s >= {TARGET:g} x in-process (cart demo's path)",
                     "value": round(ratio, 3), "met": bool(ratio >= TARGET)}],
    }
    (out / "train_speed.json").write_text(json.dumps(result, indent=2))
    plot(arms, out / "train_speed.png", f"{label}, {args.epochs} epochs: Ray Train vs in-process")
    for name, arm in arms.items():
        print(f"{name:12s} {arm['steps_per_s']:7.2f} steps/s  threads {arm.get('torch_threads')}  "
              f"epoch {steady_epoch_s(arm['epoch_s']):.2f}s  start+cache {arm['start_and_cache_s']}s")
    print(f"ray_default / in_process = {ratio:.3f} (target >= {TARGET:g}: {'met' if ratio >= TARGET else 'MISSED'})")
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
