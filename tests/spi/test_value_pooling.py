"""'last+mean' value heads: the running mean the search keeps equals the one the fit computes, so the value
read at a chunk boundary is the value the head was fitted on (read-out must match training)."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from spi.guides import HeadValueGuide, WeightedGuide
from spi.prompts import chat_prompt_ids, value_input_ids
from spi.search import SearchSettings, search
from spi.value import ValueExample, ValueModel, fit_value, load_value_model, new_value_model, running_mean

SETTINGS = SearchSettings(width=1, successors=3, chunk_length=4, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=12, final_pick="value", batch_prompts=8)


def test_running_mean_starts_at_each_rows_start():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    out = running_mean(hidden, torch.tensor([1, 3]))[..., 0]
    assert out[0].tolist() == [0.0, 1.0, 1.5, 2.0, 2.5]  # before the start: the state itself
    assert out[1].tolist() == [5.0, 6.0, 7.0, 8.0, 8.5]


def _pooled_head(tiny, seed=0):
    value = new_value_model("policy-head", tiny.model, tiny.name, pooling="last+mean")
    torch.manual_seed(seed)
    torch.nn.init.normal_(value.head.weight)
    return value


def test_search_reads_the_values_the_fit_computes(tiny, instructions):
    value = _pooled_head(tiny)
    out = search(tiny, instructions[:3], [1, 2, 3], replace(SETTINGS, ignore_eos=True),
                 guide=WeightedGuide([(HeadValueGuide(value), 1.0)]), progress=False)
    for instruction, r in zip(instructions[:3], out.results, strict=True):
        prompt = chat_prompt_ids(tiny.tokenizer, instruction)
        sequences = [value_input_ids(prompt, ids) for ids in r.response_ids]
        scratch = value.score_sequences(sequences, tiny.tokenizer.pad_token_id, tiny.model,
                                        starts=[len(prompt) - 1] * len(sequences))
        assert r.leaf_values == pytest.approx(scratch.tolist(), rel=1e-4, abs=1e-4)
    last_only = new_value_model("policy-head", tiny.model, tiny.name)  # the mean half changes the values
    assert last_only.head.in_features * 2 == value.head.in_features


class _TokenEmbeddingPolicy(torch.nn.Module):
    """A 'policy' whose hidden state at t is a fixed random embedding of token t alone: the last state
    says nothing about earlier tokens, so only the running mean can carry an earlier event."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        torch.nn.init.normal_(self.embed.weight, generator=torch.Generator().manual_seed(0))

    def get_decoder(self):
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def test_pooled_head_learns_an_event_anywhere_in_the_response_and_round_trips(tmp_path):
    """Reward 1 when token 7 occurs in the response (at position 2): a head reading the running mean
    ranks the two leaves of a prompt by it from the event on; one reading the last state cannot."""
    policy, g = _TokenEmbeddingPolicy(), torch.Generator().manual_seed(0)
    examples = []
    for i in range(160):
        prompt = torch.randint(10, 200, (6,), generator=g).tolist()
        response = torch.randint(10, 200, (10,), generator=g).tolist()
        if i % 2:
            response[2] = 7
        examples.append(ValueExample(prompt, response, float(i % 2), str(i // 2)))
    reports = {}
    for pooling in ("last", "last+mean"):
        model = ValueModel("policy-head", 16, "token-embedding", pooling=pooling)
        reports[pooling] = fit_value(model, examples, 0, policy, holdout_fraction=0.25, solver="ridge")
    # 11 read-outs per leaf, 8 after the event (a perfect reader: 0.86); measured 0.74 vs 0.55
    assert reports["last+mean"].holdout_pair_accuracy > 0.7
    assert reports["last"].holdout_pair_accuracy < 0.6
    model.save(tmp_path / "v")
    loaded = load_value_model(tmp_path / "v")
    assert loaded.pooling == "last+mean"
    seq = [value_input_ids(examples[1].prompt_ids, examples[1].response_ids)]
    assert torch.allclose(loaded.score_sequences(seq, 0, policy, starts=[5]),
                          model.score_sequences(seq, 0, policy, starts=[5]))
