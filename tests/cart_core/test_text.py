"""The text encoder (cart_core/text.py): names, and the fine-tuning path that recomputes top layers."""
from __future__ import annotations

import pytest
import torch

from cart_core.text import TextEncoder, resolve_model_path


def test_unknown_names_pass_through_to_transformers():
    assert resolve_model_path("some-org/some-encoder") == "some-org/some-encoder"


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_top_layers_recomputed_from_the_cache_match_the_full_forward(tmp_path, arch):
    """Fine-tuning recomputes the top layers from cached lower states; MPNet's layers also need the
    encoder's relative position bias, without which training and inference would disagree."""
    from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    small = dict(vocab_size=30527, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    model = BertModel(BertConfig(**small)) if arch == "bert" else MPNetModel(MPNetConfig(**small))
    if arch == "mpnet":  # a bias large enough that leaving it out shows
        torch.nn.init.normal_(model.encoder.relative_attention_bias.weight, 0.0, 1.0)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(tmp_path)
    encoder = TextEncoder(str(tmp_path), max_tokens=16)
    states, mask = encoder.layer_states(["a dog runs on the grass", "two people"])
    top = encoder.run_top_layers(states[:, -3], mask, 2)
    valid = lambda x: x.transpose(1, 2)[mask]  # noqa: E731  (padding positions are never read)
    torch.testing.assert_close(valid(top), valid(states[:, -2:]), atol=1e-5, rtol=1e-4)
    if arch == "mpnet":  # and the check has teeth: the same layer without the bias differs
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None, None, :]
        without_bias = encoder.top_layer_modules(2)[0](states[:, -3], attention_mask=additive)[0]
        assert (valid(without_bias[:, None]) - valid(states[:, -2:-1])).abs().max() > 1e-2


def test_more_query_tokens_than_the_encoder_takes_are_refused_by_the_driver_and_cut_where_it_loads():
    """1024 tokens passed the config and failed on the first long query, with its whole batch. A
    job's driver refuses it; a generator committed with it before answers, its queries cut at 512."""
    from cart_core.errors import ConfigError
    from cart_core.text import TextEncoder, check_encoder_settings

    check_encoder_settings("minilm", 512, finetune_layers=5)
    with pytest.raises(ConfigError, match=r"generator.max_query_tokens: 513 is more than the text encoder 'minilm' "
                                          r"takes \(512 tokens\)"):
        check_encoder_settings("minilm", 513)
    with pytest.raises(ConfigError, match=r"generator.finetune_layers: 6 is out of range; must be in \[0, 5\]"):
        check_encoder_settings("minilm", 32, finetune_layers=6)
    encoder = TextEncoder("minilm", 1024)
    assert encoder.max_tokens == 512
    assert encoder.sentence_embeddings(["a, " * 600]).shape == (1, 384)
