import re
import dataclasses
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import yaml

from cart_core.config import CartConfig, config_dict, load_config
from cart_core.errors import ConfigError


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


SECTIONS = [f.name for f in dataclasses.fields(CartConfig)]


def _fields(cls, prefix=""):
    """(dotted key, type hint, default) of every leaf field."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            yield from _fields(sub, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f.default


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_refuses_an_unknown_key_and_a_bad_value(section):
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\) \['{section}.colour'\]; {section} has: "):
        load_config(None, [f"{section}.colour=1"])
    key = next(k for k, hint, default in _fields(CartConfig) if k.startswith(section + ".")
               and type(default) in (int, float, bool))
    with pytest.raises(ConfigError, match=rf"with --set: {key}: 'plenty' is not a valid"):
        load_config(None, [f"{key}=plenty"])


CHOICES = [(k, get_args(h)) for k, h, _ in _fields(CartConfig) if get_origin(h) is Literal]


def test_choice_fields_are_declared():
    assert {k for k, _ in CHOICES} >= {"identifiers.source", "identifiers.fine", "generator.query",
                                        "generator.output_head", "verify.mode"}


@pytest.mark.parametrize("key, choices", CHOICES, ids=[k for k, _ in CHOICES])
def test_a_bad_choice_is_refused_naming_the_choices(key, choices, tmp_path):
    section, name = key.rsplit(".", 1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {name: "bogus"}}))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: {key}: 'bogus' is not one of {' | '.join(choices)}"
    needs = ["generator.query_dim=8"] if key == "generator.query" else []  # vector queries need their width
    for choice in choices:
        assert getattr(getattr(load_config(None, [f"{key}={choice}", *needs]), section), name) == choice


def test_a_section_given_a_value_is_refused():
    with pytest.raises(ConfigError, match="train must be a section"):
        load_config(None, ["train=3"])


def test_shown_config_loads_back_to_the_same_config(tmp_path):
    from pipelines.data_paths import REPO_ROOT

    for name in ("default.yaml", "small.yaml", "demo.yaml", "demo-quick.yaml"):
        cfg = load_config(REPO_ROOT / "configs" / name)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        assert load_config(path) == cfg


def _numeric_keys(cls=CartConfig, prefix: str = "") -> dict[str, object]:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(_numeric_keys(type(default), f"{prefix}{f.name}."))
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out[f"{prefix}{f.name}"] = default
        elif default is None and any(k in str(f.type).replace(" ", "").split("|") for k in ("float", "int")):
            out[f"{prefix}{f.name}"] = default  # `float | None`: null or a number in range
    return out


def test_range_tables_name_real_numeric_keys():
    from cart_core.config import ABOVE_ZERO, AT_LEAST_ONE, SHARES

    keys = _numeric_keys()
    assert sorted((AT_LEAST_ONE | ABOVE_ZERO | set(SHARES)) - set(keys)) == []
    assert not (AT_LEAST_ONE & ABOVE_ZERO) and not (AT_LEAST_ONE & set(SHARES))


@pytest.mark.parametrize("key", sorted(_numeric_keys()))
def test_every_number_has_a_range_and_a_negative_value_is_refused(key):
    with pytest.raises(ConfigError, match=rf"with --set: {re.escape(key)}: -2(\.0)? is out of range; must be "):
        load_config(None, [f"{key}=-2"])


@pytest.mark.parametrize("override, rule", [
    ("train.epochs=0", ">= 1"), ("identifiers.n_clusters=0", ">= 1"), ("train.lr=0", "> 0"),
    ("generator.dropout=1", r"in \[0, 1\)"), ("reindex.fallback_fpr=1.5", r"in \[0, 1\]"), ("train.lr=.nan", "> 0"),
])
def test_out_of_range_values_are_refused_with_the_range(override, rule):
    with pytest.raises(ConfigError, match=rf"is out of range; must be {rule}"):
        load_config(None, [override])


def test_in_range_edges_are_accepted():
    cfg = load_config(None, ["train.epochs=1", "generator.dropout=0", "reindex.fallback_fpr=1", "jobs.train_workers=0",
                             "verify.clusters=0", "reindex.id_deltas=0", "reindex.fallback_impostors=0",
                             "jobs.train_max_failures=-1"])
    assert cfg.train.epochs == 1 and cfg.generator.dropout == 0.0 and cfg.jobs.train_workers == 0
    assert cfg.verify.clusters == 0 and cfg.reindex.id_deltas == 0 and cfg.jobs.train_max_failures == -1


def test_checking_a_config_loads_no_model_library():
    """The CLI refuses a bad config before any model code loads: neither cart_core.config nor the
    CLI module imports torch, Ray, transformers or faiss (torch alone took ~2 s of a typo's error)."""
    import subprocess
    import sys

    heavy = ("torch", "ray", "transformers", "faiss")
    code = ("import sys, cart_core.config, pipelines.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_model_modules_re_export_their_settings():
    """The settings moved to cart_core.settings; the old import paths name the same classes."""
    from cart_core import settings
    from cart_core.alignment import AlignConfig
    from cart_core.caption_metric import CaptionMetricConfig
    from cart_core.caption_predictor import PredictorConfig
    from cart_core.generator import GeneratorConfig
    from cart_core.hybrid import VerifyConfig
    from cart_core.rqvae import RQVAEConfig
    from cart_core.training import TrainConfig

    assert (AlignConfig, CaptionMetricConfig, PredictorConfig, GeneratorConfig, VerifyConfig, RQVAEConfig,
            TrainConfig) == (settings.AlignConfig, settings.CaptionMetricConfig, settings.PredictorConfig,
                             settings.GeneratorConfig, settings.VerifyConfig, settings.RQVAEConfig,
                             settings.TrainConfig)


@pytest.mark.parametrize("override, match", [
    ("verify.expand_depth=0", r"verify.expand_depth: 0 is out of range; must be >= 1"),
    ("verify.caption_predictor.folds=1", r"verify.caption_predictor.folds: 1 is out of range; cross-fitting needs >= 2"),
    ("verify.caption_predictor.alphas=[]", r"verify.caption_predictor.alphas: \[\] has no ridge strength; give one or more > 0"),
    ("verify.caption_predictor.alphas=[0.1, -1]", r"alphas: -1 is not a ridge strength > 0"),
    ("verify.caption_predictor.alphas=[0.1, fast]", r"alphas: 'fast' is not a ridge strength > 0"),
    ("verify.signals=[]", r"verify.signals: \[\] has nothing to rank items with captions by"),
    ("verify.signals=[predicted_caption_cos]", r"has nothing to rank items with captions by; add one of \['caption_cos'"),
    ("verify.signals=caption_cos", r"verify.signals: 'caption_cos' must be a list of signal names"),
])
def test_verify_settings_that_would_fail_after_training_are_refused_at_load(override, match):
    """Each of these used to pass the config check and fail only in fit_verifier, after the whole
    generator training, as a ValueError or TypeError."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_ridge_strengths_written_as_yaml_text_are_numbers():
    assert load_config(None, ["verify.caption_predictor.alphas=[1e-3, 0.1]"]).verify.caption_predictor.alphas == [0.001, 0.1]


def test_a_generative_only_verifier_needs_no_signal():
    assert load_config(None, ["verify.mode=generative", "verify.signals=[]"]).verify.signals == []


@pytest.mark.parametrize("override, message", [
    ("train.epochs=yes", "train.epochs: True is not a valid int"),       # YAML reads yes / on / true as booleans
    ("train.lr=on", "train.lr: True is not a valid float"),
    ("jobs.retrieve_actors=true", "jobs.retrieve_actors: True is not a valid int"),
    ("generator.text_encoder=", "generator.text_encoder: no value given; a str is needed"),
    ("generator.text_encoder=[a, b]", "generator.text_encoder: ['a', 'b'] is not a valid str"),
    ("extract.image_model={a: 1}", "extract.image_model: {'a': 1} is not a valid str"),
    ("train.epochs=", "train.epochs: no value given; an int is needed"),
    ("generator.d_model=30", "generator.d_model: 30 is not a multiple of generator.n_heads = 4"),
    ("generator.query=vector", "generator.query: 'vector' needs generator.query_dim > 0"),
])
def test_a_value_that_would_fail_later_or_mean_something_else_is_refused_at_load(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_the_same_values_written_as_meant_load():
    cfg = load_config(None, ["train.epochs=3", "train.lr=1e-4", "reindex.finetune=yes", "generator.max_query_tokens=512",
                             "eval.k=100", "generator.d_model=32", "generator.query=vector", "generator.query_dim=8"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.reindex.finetune) == (3, 1e-4, True)
    assert (cfg.generator.max_query_tokens, cfg.eval.k, cfg.generator.d_model) == (512, 100, 32)
    assert load_config(None, ["queries.max_k=5"]).queries.max_k == 5  # a serving limit below eval.k's 10


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 3, lr: 0.01}\neval: {k: 5}\ntrain: {batch_size: 16}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: line 3: key 'train' is given twice (first on line 1); give each key once"
    path.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="line 3: key 'epochs' is given twice"):
        load_config(path)


def test_yaml_merge_keys_still_load(tmp_path):
    """`<<: *anchor` brings keys in that the section may override: not a key given twice."""
    path = tmp_path / "c.yaml"
    path.write_text("extract: &pool {num_cpus: 0.5, actors: 3}\ncaption: {<<: *pool, actors: 2}\n")
    cfg = load_config(path)
    assert (cfg.caption.num_cpus, cfg.caption.actors, cfg.extract.actors) == (0.5, 2, 3)


def test_a_config_path_that_is_not_a_text_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the YAML config file"):
        load_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 17\)"):
        load_config(path)
