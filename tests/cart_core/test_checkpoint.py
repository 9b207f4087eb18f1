"""A run resumed from a checkpoint continues exactly as the uninterrupted run (no pickle involved)."""
import numpy as np
import pytest
import torch

from cart_core.checkpoint import load_checkpoint, save_checkpoint
from cart_core.generator import Generator, GeneratorConfig
from cart_core.training import TrainConfig, train_generator


def _data():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    codes = np.stack([rng.integers(0, 8, 300), rng.integers(0, 4, 300)], 1)
    cfg = GeneratorConfig(query="vector", query_dim=16, vocab_sizes=[8, 4], d_model=32, n_layers=1, ff_dim=64)
    return queries, codes, cfg


@pytest.mark.parametrize("stop_after", [0, 2])
def test_resume_matches_uninterrupted_run(tmp_path, stop_after):
    queries, codes, cfg = _data()
    train_cfg = TrainConfig(epochs=4, batch_size=32)
    torch.manual_seed(0)
    full = train_generator(Generator(cfg), queries, codes, train_cfg, progress=False)

    torch.manual_seed(0)
    first = Generator(cfg)

    def checkpoint(epoch, history, optimizer, scheduler):
        if epoch == stop_after:
            save_checkpoint(tmp_path, first, epoch, history, optimizer, scheduler)

    train_generator(first, queries, codes, train_cfg, progress=False, checkpoint=checkpoint)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    resumed, state = load_checkpoint(tmp_path)
    assert state.epoch == stop_after + 1
    history = train_generator(resumed, queries, codes, train_cfg, progress=False, resume=state)
    np.testing.assert_allclose(history["loss"], full["loss"], rtol=1e-5)


def test_pair_weights_change_the_loss():
    queries, codes, cfg = _data()
    train_cfg = TrainConfig(epochs=1, batch_size=32)
    torch.manual_seed(0)
    plain = train_generator(Generator(cfg), queries, codes, train_cfg, progress=False)
    torch.manual_seed(0)
    ones = train_generator(Generator(cfg), queries, codes, train_cfg, progress=False, weights=np.ones(300))
    np.testing.assert_allclose(ones["nll"], plain["nll"], rtol=1e-5)
    torch.manual_seed(0)
    weights = np.where(np.arange(300) % 2 == 0, 1.0, 0.1)
    weighted = train_generator(Generator(cfg), queries, codes, train_cfg, progress=False, weights=weights)
    assert not np.allclose(weighted["nll"], plain["nll"])
