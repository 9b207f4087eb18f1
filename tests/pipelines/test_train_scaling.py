"""`cart train`'s defaults size Ray Train from what Ray reports (jobs.train_workers / cpus_per_worker = 0)."""
from __future__ import annotations

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


def test_no_matching_node_up_yet_asks_for_what_an_autoscaler_can_start(ray_local):
    """An autoscaling cluster whose GPU group starts at zero: the request itself starts nodes."""
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml", ["jobs.use_gpu=true"])
    scaling = train_scaling(cfg)
    assert (scaling.workers, scaling.cpus_per_worker, scaling.threads) == (1, 1.0, 1)
    assert "no node with a CPU and a GPU is up yet" in scaling.chosen
    assert train_scaling(cfg, workers=2).workers == 2


def test_more_workers_than_cpus_get_a_share_of_a_cpu(ray_local):
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml")
    cpus = ray_local.cluster_resources()["CPU"]
    scaling = train_scaling(cfg, workers=int(cpus) * 2)
    assert scaling.cpus_per_worker == 0.5 and scaling.threads == 1
