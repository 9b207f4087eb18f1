"""`cart train`'s defaults size Ray Train from what Ray reports (jobs.train_workers / cpus_per_worker = 0)."""
from __future__ import annotations

from cart_core.config import load_config
from pipelines.data_paths import REPO_ROOT
from pipelines.train import train_scaling, worker_slots


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


def test_worker_slots_count_like_ray():
    """Each worker on one node, in Ray's fixed point: 2 CPUs hold five 0.4-CPU workers (2 // 0.4
    is 4.0 in floats), a GPU worker needs its GPU."""
    two, four_gpu = {"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}
    assert worker_slots([two], 0.4, gpu=False) == 5
    assert worker_slots([two], 0.5, gpu=False) == 4 and worker_slots([two], 0.6, gpu=False) == 3
    assert worker_slots([two, two], 2.0, gpu=False) == 2 and worker_slots([two], 3.0, gpu=False) == 0
    assert worker_slots([two, four_gpu], 1.0, gpu=True) == 1


def test_workers_no_node_can_hold_are_refused_on_a_ray_started_here(ray_local):
    """Ray Train would retry its start for ever on a Ray nothing can add nodes to."""
    import pytest

    from cart_core.errors import BadInput
    from pipelines.train import TrainScaling, check_placement

    cfg = load_config(REPO_ROOT / "configs" / "small.yaml")
    cpus = ray_local.cluster_resources()["CPU"]
    check_placement(TrainScaling(int(cpus * 2), 0.5, "config"), cfg)  # fits exactly
    with pytest.raises(BadInput, match=r"x 0.5 CPU cannot be placed on this machine's Ray"):
        check_placement(TrainScaling(int(cpus * 2) + 1, 0.5, "config"), cfg)
