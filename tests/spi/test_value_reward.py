import torch

from spi.reward import ClassifierReward, LLMJudgeReward
from spi.value import ValueExample, evaluate_value, fit_value, load_value_model, new_value_model


def _examples(tiny, n=24):
    """Reward +1 for responses of token 1000, -1 for responses of token 2000 (random lengths)."""
    g = torch.Generator().manual_seed(0)
    prompt = tiny.tokenizer("Say something.")["input_ids"]
    out = []
    for i in range(n):
        good = i % 2 == 0
        response = [1000 if good else 2000] * int(torch.randint(3, 9, (1,), generator=g))
        out.append(ValueExample(prompt, response, 1.0 if good else -1.0, str(i)))
    return out


def test_value_fit_learns_and_round_trips(tiny, tmp_path):
    examples = _examples(tiny)
    model = new_value_model("policy-head", tiny.model, tiny.name)
    mse_untrained, _ = evaluate_value(model, examples, tiny.tokenizer.pad_token_id, tiny.model)
    report = fit_value(model, examples, tiny.tokenizer.pad_token_id, tiny.model, epochs=60,
                       learning_rate=0.05, batch_size=8, holdout_fraction=0.25)
    assert report.holdout_sequences == 6
    assert report.holdout_explained_variance > 0.3
    mse, explained = evaluate_value(model, examples, tiny.tokenizer.pad_token_id, tiny.model)
    assert mse < 0.5 * mse_untrained  # the untrained head's error is the rewards' variance (1): halved at least
    assert explained > 0.6  # over all examples, 3/4 of them seen in training
    sequences = [e.prompt_ids + e.response_ids for e in examples[:5]]
    before = model.score_sequences(sequences, tiny.tokenizer.pad_token_id, tiny.model)
    loaded = load_value_model(model.save(tmp_path / "v"))
    after = loaded.score_sequences(sequences, tiny.tokenizer.pad_token_id, tiny.model)
    torch.testing.assert_close(before, after)
    assert loaded.report.holdout_sequences == 6


def test_ridge_head_is_the_cross_validated_exact_fit(tiny):
    """Pairs (good, bad) per prompt group: the ridge head separates them on held-out groups, and the
    chosen penalty beats every other candidate on grouped cross-validation by construction."""
    import dataclasses

    examples = [dataclasses.replace(e, group=str(i // 2)) for i, e in enumerate(_examples(tiny, 32))]
    model = new_value_model("policy-head", tiny.model, tiny.name)
    report = fit_value(model, examples, tiny.tokenizer.pad_token_id, tiny.model, holdout_fraction=0.25,
                       solver="ridge")
    assert report.ridge_penalty is not None
    assert report.holdout_explained_variance > 0.5
    assert report.holdout_pair_accuracy > 0.8  # the shared last prompt position is a tie (1/2)
    scores = model.score_sequences([e.prompt_ids + e.response_ids for e in examples[:4]],
                                   tiny.tokenizer.pad_token_id, tiny.model)
    assert scores[0] > scores[1] and scores[2] > scores[3]


def test_ridge_solver_needs_frozen_features(tiny):
    import pytest

    model = new_value_model("backbone", tiny.model, tiny.name, backbone_name="tiny-llama")
    with pytest.raises(ValueError, match="ridge"):
        fit_value(model, _examples(tiny, 8), tiny.tokenizer.pad_token_id, solver="ridge")


def test_corrupt_value_model_is_refused(tiny, tmp_path):
    folder = new_value_model("policy-head", tiny.model, tiny.name).save(tmp_path / "v")
    data = bytearray((folder / "head.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "head.safetensors").write_bytes(bytes(data))
    import pytest

    with pytest.raises(ValueError, match="checksum"):
        load_value_model(folder)


def test_batched_value_scoring_equals_one_at_a_time(tiny):
    model = new_value_model("backbone", tiny.model, tiny.name, backbone_name="tiny-llama")
    torch.nn.init.normal_(model.head.weight)
    sequences = [e.prompt_ids + e.response_ids for e in _examples(tiny, 6)]
    with torch.no_grad():
        batched = model.score_sequences(sequences, tiny.tokenizer.pad_token_id)
        single = torch.stack([model.score_sequences([s], tiny.tokenizer.pad_token_id)[0] for s in sequences])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_batched_rewards_equal_one_at_a_time():
    instructions = ["What is 2+2?", "Name a colour.", "Write a long sentence about the sea and its waves."]
    responses = ["4", "Blue is a colour that many people like.", "The sea."]
    for reward in (LLMJudgeReward("tiny-llama", batch_size=3), ClassifierReward("tiny-reward", batch_size=3)):
        batched = reward.score(instructions, responses)
        single = [reward.score([x], [y])[0] for x, y in zip(instructions, responses, strict=True)]
        assert len(batched) == 3
        torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-4, rtol=1e-4)
    assert LLMJudgeReward("tiny-llama").identity != LLMJudgeReward("tiny-llama", rubric="Good? {instruction} {response}").identity
