"""Generator: fusion branches switch on/off, R-Drop, vector and text queries, save/load, learning."""
import dataclasses

import numpy as np
import pytest
import torch

from cart_core.corpus import split_captions, synthetic_corpus
from cart_core.generator import Generator, GeneratorConfig
from cart_core.identifiers import build_identifiers
from cart_core.metrics import retrieval_metrics
from cart_core.retrieval import GenerativeRetriever
from cart_core.text import TextEncoder
from cart_core.training import TrainConfig, train_generator


def vector_setup(n=60, dim=12, seed=0, **cfg_kwargs):
    rng = np.random.default_rng(seed)
    ids = np.array([f"v{i}" for i in range(n)], dtype=object)
    table = build_identifiers(ids, rng.integers(0, 4, n), rng.integers(0, 4, (n, 2)), n_clusters=4, codebook_size=4)
    cfg = GeneratorConfig(vocab_sizes=table.vocab_sizes, query="vector", query_dim=dim, d_model=32,
                          n_heads=2, ff_dim=64, vector_hidden=32, **cfg_kwargs)
    return rng.normal(size=(n, dim)).astype(np.float32), table, cfg


@pytest.mark.parametrize("coarse,fine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("rdrop", [0.0, 1.0])
def test_every_ablation_trains(coarse, fine, rdrop):
    queries, table, cfg = vector_setup(coarse_fusion=coarse, fine_fusion=fine)
    model = Generator(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert any("coarse_gate" in n for n in names) == coarse
    assert any("fine_attn" in n for n in names) == fine
    assert any("plain_attn" in n for n in names) == (not coarse and not fine)
    hist = train_generator(model, queries, table.codes, TrainConfig(epochs=3, batch_size=16, rdrop_weight=rdrop),
                           progress=False)
    assert np.isfinite(hist["loss"]).all() and hist["nll"][-1] < hist["nll"][0]
    assert (np.array(hist["kl"]) > 0).all() == (rdrop > 0)


def test_vector_queries_memorise_and_retrieve():
    queries, table, cfg = vector_setup(n=40)
    model = Generator(dataclasses.replace(cfg, dropout=0.0))
    train_generator(model, queries, table.codes, TrainConfig(epochs=60, batch_size=20, lr=3e-3, rdrop_weight=0),
                    progress=False)
    rows, scores = GenerativeRetriever(model, table).search(queries, k=5, beam_size=10)
    assert retrieval_metrics(rows, np.arange(40))["R@1"] >= 90
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("head", ["linear", "prototype"])
def test_next_log_probs_equal_the_full_forward_at_every_level(head):
    """Beam search scores only the next position's slice of the output head; it must be exactly
    what the full forward gives for that position."""
    queries, table, cfg = vector_setup(output_head=head)
    model = Generator(cfg).eval()
    dec = model.decoder
    with torch.no_grad():
        torch.nn.init.normal_(dec.out.weight)
        memory = dec.prepare_memory(*model.encode_queries(queries[:6]))
        codes = torch.as_tensor(table.codes[:6])
        for level in range(table.length):
            full = dec.position_log_probs(dec(memory, codes[:, :level])[:, -1], level)
            torch.testing.assert_close(dec.next_log_probs(memory, codes[:, :level], level), full)


def test_save_load_gives_identical_scores(tmp_path):
    queries, table, cfg = vector_setup()
    model = Generator(cfg).eval()
    model.save(tmp_path / "gen")
    loaded = Generator.load(tmp_path / "gen")
    assert (tmp_path / "gen" / "generator.safetensors").exists() and (tmp_path / "gen" / "config.json").exists()
    a = GenerativeRetriever(model, table).search(queries[:8], k=5, beam_size=5)
    b = GenerativeRetriever(loaded, table).search(queries[:8], k=5, beam_size=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def test_retriever_rejects_mismatched_vocabulary():
    queries, table, cfg = vector_setup()
    model = Generator(dataclasses.replace(cfg, vocab_sizes=[5, 4, 4, table.vocab_sizes[-1]]))
    with pytest.raises(ValueError, match="does not match"):
        GenerativeRetriever(model, table)


def test_unknown_query_kind():
    with pytest.raises(ValueError, match="unknown query kind"):
        Generator(GeneratorConfig(vocab_sizes=[2, 2], query="audio"))


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder()


def test_text_encoder_exposes_all_layers(minilm):
    states, mask = minilm.layer_states(["a dog runs", "two children play on the beach"])
    assert states.shape[:2] == (2, minilm.num_layers) and states.shape[-1] == minilm.hidden_size
    assert mask.dtype == torch.bool and mask[1].all() and not mask[0].all()
    emb = minilm.sentence_embeddings(["a dog runs"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_text_generator_learns_synthetic_captions(minilm):
    corpus = synthetic_corpus(n_items=120, dim=16, n_captions=4, n_topics=6, seed=1)
    (train_item, train_text), (query_item, query_text) = split_captions(corpus, 3)
    rng = np.random.default_rng(0)
    table = build_identifiers(corpus.item_ids, rng.integers(0, 8, 120), rng.integers(0, 8, (120, 1)),
                              n_clusters=8, codebook_size=8)
    cfg = GeneratorConfig(vocab_sizes=table.vocab_sizes, d_model=64, n_heads=4, ff_dim=128, n_layers=1)
    model = Generator(cfg, text_encoder=minilm)
    train_generator(model, train_text, table.codes[train_item], TrainConfig(epochs=25, batch_size=32, lr=2e-3),
                    progress=False)
    rows, _ = GenerativeRetriever(model, table).search(query_text, k=10, beam_size=10)
    # chance R@10 is 10/120 = 8%; held-out captions must do far better
    assert retrieval_metrics(rows, query_item)["R@10"] > 40


def test_finetuned_top_layer_changes_and_round_trips(tmp_path):
    encoder = TextEncoder()  # own instance: this test changes its weights
    texts = ["a dog runs on grass", "a red car in the rain", "children at the beach", "a cat sleeps"] * 4
    table = build_identifiers(np.array([f"t{i}" for i in range(4)], dtype=object), np.arange(4),
                              np.zeros((4, 1), int), n_clusters=4, codebook_size=1)
    codes = table.codes[np.arange(16) % 4]
    cfg = GeneratorConfig(vocab_sizes=table.vocab_sizes, d_model=32, n_heads=2, ff_dim=64, n_layers=1,
                          finetune_layers=1)
    model = Generator(cfg, text_encoder=encoder)
    top = model.tuned_encoder_layers()[0]
    before = {k: v.clone() for k, v in top.state_dict().items()}
    shared_top = encoder.top_layer_modules(1)[0]
    bottom = encoder.model.encoder.layer[0].state_dict()["attention.self.query.weight"].clone()
    train_generator(model, texts, codes, TrainConfig(epochs=3, batch_size=8, encoder_lr=1e-3), progress=False)
    after = top.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the top block learned
    # ... in the generator's own copy: the encoder passed in (maybe shared) is untouched
    assert all(torch.equal(before[k], v) for k, v in shared_top.state_dict().items())
    assert torch.equal(encoder.model.encoder.layer[0].state_dict()["attention.self.query.weight"], bottom)
    model.save(tmp_path / "g")
    loaded = Generator.load(tmp_path / "g", text_encoder=TextEncoder())
    a = GenerativeRetriever(model, table).search(texts[:4], k=2, beam_size=4)
    b = GenerativeRetriever(loaded, table).search(texts[:4], k=2, beam_size=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-5)


def test_distillation_keeps_old_pairs_that_are_no_longer_trained_on():
    """Old pairs with loss weight 0 are only held by KL to the teacher: with it the fine-tuned
    model still retrieves them, without it it forgets them for the new targets."""
    queries, table, cfg = vector_setup(n=40)
    cfg = dataclasses.replace(cfg, dropout=0.0)
    train_cfg = TrainConfig(epochs=60, batch_size=20, lr=3e-3, rdrop_weight=0)
    teacher = Generator(cfg)
    train_generator(teacher, queries, table.codes, train_cfg, progress=False)
    new_codes = table.codes.copy()
    new_codes[:20] = table.codes[20:]  # the first 20 queries are taught other items' identifiers ...
    weights = np.r_[np.ones(20), np.zeros(20)].astype(np.float32)  # ... the last 20 get no loss of their own
    old = {}
    for weight in (0.0, 1.0):
        student = Generator(cfg)
        student.load_state_dict(teacher.state_dict())
        train_generator(student, queries, new_codes, dataclasses.replace(train_cfg, epochs=30), progress=False,
                        weights=weights, teacher=teacher, distill=1 - weights, distill_weight=weight)
        rows, _ = GenerativeRetriever(student, table).search(queries[20:], k=1, beam_size=5)
        old[weight] = retrieval_metrics(rows, np.arange(20, 40))["R@1"]
    assert old[1.0] >= 90 and old[1.0] > old[0.0] + 20, old
