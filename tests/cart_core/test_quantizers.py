"""K-Means coarse quantizer and RQ-VAE: fitting, determinism, usage statistics, persistence."""
import numpy as np
import pytest
import torch

from cart_core.kmeans import CoarseQuantizer, cluster_imbalance, l2_normalize
from cart_core.rqvae import RQVAE, RQVAEConfig, code_perplexity, fit_rqvae


def blobs(n=2000, d=16, k=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(k, d) * 6 if k <= d else rng.normal(size=(k, d)) * 4  # separated blobs
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_recovers_blobs_and_is_deterministic(spherical):
    x, labels = blobs()
    a = CoarseQuantizer.fit(x, 8, spherical=spherical, n_redo=5, seed=1)
    b = CoarseQuantizer.fit(x, 8, spherical=spherical, n_redo=5, seed=1)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assigned, dist = a.assign(x, batch_size=300)  # several batches
    # each true blob maps (almost) entirely to one cluster
    purity = sum(np.bincount(assigned[labels == c]).max() for c in range(8)) / len(x)
    assert purity > 0.95
    assert dist.shape == (len(x),) and np.all(dist >= 0)
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1, atol=1e-4)


def test_kmeans_samples_for_training_and_round_trips(tmp_path):
    x, _ = blobs(n=5000)
    q = CoarseQuantizer.fit(x, 8, sample_size=1000)
    q.save(tmp_path)
    loaded = CoarseQuantizer.load(tmp_path)
    np.testing.assert_array_equal(loaded.assign(x)[0], q.assign(x)[0])


def test_kmeans_refuses_fewer_points_than_clusters():
    with pytest.raises(ValueError, match="cannot fit 10 clusters on 5 vectors"):
        CoarseQuantizer.fit(np.ones((5, 4), np.float32), 10)


def test_cluster_imbalance():
    even = cluster_imbalance(np.repeat(np.arange(4), 10), 4)
    skewed = cluster_imbalance(np.array([0] * 37 + [1, 2, 3]), 4)
    assert even["imbalance"] == pytest.approx(1.0)
    assert skewed["imbalance"] > 3 and skewed["max_size"] == 37
    assert cluster_imbalance(np.zeros(5, int), 3)["empty_clusters"] == 2


def test_residuals_are_what_the_centre_leaves():
    x, _ = blobs(n=500)
    q = CoarseQuantizer.fit(x, 8)
    labels, _ = q.assign(x)
    np.testing.assert_allclose(q.residuals(x, labels) + q.centroids[labels], l2_normalize(x), atol=1e-6)


def test_rqvae_learns_uses_codes_and_reduces_error(tmp_path):
    x, _ = blobs(n=3000, d=16, k=32, seed=2)
    cfg = RQVAEConfig(levels=2, codebook_size=16, latent_dim=8, hidden_dim=64, epochs=15, batch_size=256)
    model, report = fit_rqvae(x, cfg, progress=False)
    codes = model.encode(x)
    assert codes.shape == (3000, 2) and codes.min() >= 0 and codes.max() < 16
    # k-means init + dead-code reset: most codes in use at every level
    assert all(p > 8 for p in report["perplexity"]), report["perplexity"]
    assert report["recon_mse_scaled"][-1] < report["recon_mse_scaled"][0]
    assert report["relative_recon_error"] < 0.5
    model.save(tmp_path)
    np.testing.assert_array_equal(RQVAE.load(tmp_path).encode(x), codes)


def test_rqvae_second_level_refines_first():
    x, _ = blobs(n=2000, d=16, k=16, seed=3)
    model, _ = fit_rqvae(x, RQVAEConfig(levels=3, codebook_size=8, latent_dim=8, epochs=5), progress=False)
    with torch.no_grad():
        z = model.encoder(torch.from_numpy(x) / model.input_scale)
        residual, norms = z, [float(z.norm(dim=1).mean())]
        for level in range(3):
            book = model.codebooks[level]
            residual = residual - book[torch.cdist(residual, book).argmin(1)]
            norms.append(float(residual.norm(dim=1).mean()))
    assert norms == sorted(norms, reverse=True)


def test_code_perplexity_bounds():
    assert code_perplexity(np.zeros((10, 1), int), 4) == [pytest.approx(1.0)]
    assert code_perplexity(np.arange(8).reshape(-1, 1) % 4, 4) == [pytest.approx(4.0)]


def test_rqvae_error_report_survives_zero_residuals():
    """Items alone in their cluster have a zero residual; the report must stay meaningful."""
    x, _ = blobs(n=600, d=16, k=8, seed=4)
    x[:50] = 0.0
    model, report = fit_rqvae(x, RQVAEConfig(levels=2, codebook_size=8, latent_dim=8, epochs=3), progress=False)
    assert np.isfinite(report["relative_recon_error"]) and 0 <= report["relative_recon_error"] < 1
    errors = model.reconstruction_error(x)
    assert errors.shape == (600,) and np.isfinite(errors).all()
