"""`cart train`'s defaults size Ray Train from what Ray reports (jobs.train_workers / cpus_per_worker = 0)."""
from __future__ import annotations

import pytest

from cart_core.config import load_config
from pipelines.data_paths import REPO_ROOT
from pipelines.train import train_scaling


def test_default_config_takes_every_cpu_of_the_node(ray_local):
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml")
    assert (cfg.jobs.train_workers, cfg.jobs.cpus_per_worker) == (0, 0.0)
    scaling = train_scaling(cfg)
    cpus = ray_local.cluster_resources()["CPU"]
    assert (scaling.workers, scaling.cpus_per_worker, scaling.threads) == (1, cpus, int(cpus))
    assert scaling.chosen.startswith("auto: 1 node(s)")


def test_workers_given_share_the_node(ray_local):
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml")
    scaling = train_scaling(cfg, workers=2)
    assert (scaling.workers, scaling.cpus_per_worker) == (2, max(1.0, ray_local.cluster_resources()["CPU"] // 2))


def test_explicit_sizes_are_kept(ray_local):
    cfg = load_config(REPO_ROOT / "configs" / "small.yaml")
    scaling = train_scaling(cfg)
    assert (scaling.workers, scaling.cpus_per_worker, scaling.threads, scaling.chosen) == (1, 0.5, 1, "config")


def test_gpu_training_without_a_gpu_node_is_refused(ray_local):
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml", ["jobs.use_gpu=true"])
    with pytest.raises(RuntimeError, match="no node with a CPU and a GPU"):
        train_scaling(cfg)
