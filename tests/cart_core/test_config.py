import pytest

from cart_core.config import load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("identifiers:\n  n_clusters: 16\n  rqvae: {levels: 3}\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=7", "generator.coarse_fusion=false", "identifiers.source=both"])
    assert cfg.identifiers.n_clusters == 16 and cfg.identifiers.rqvae.levels == 3
    assert cfg.train.epochs == 7 and cfg.generator.coarse_fusion is False and cfg.identifiers.source == "both"


@pytest.mark.parametrize("override,match", [
    ("train.epochz=3", "unknown config key"),
    ("train", "not key=value"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_values_take_their_field_type():
    cfg = load_config(None, ["train.lr=1e-3", "train.epochs=3.0", "generator.fine_fusion=False"])
    assert cfg.train.lr == pytest.approx(0.001) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.generator.fine_fusion is False


@pytest.mark.parametrize("override", ["train.lr=fast", "train.epochs=2.5", "generator.fine_fusion=maybe"])
def test_values_of_the_wrong_type_are_refused(override):
    with pytest.raises(ValueError, match="is not a valid"):
        load_config(None, [override])
