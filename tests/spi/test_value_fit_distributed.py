"""The backbone value fit at scale: data-parallel processes, micro-batches, master weights, V_k from a
reward model. Tiny random Llama backbones, a few steps, on the CPU (gloo)."""

import pytest
import torch

from spi.models import load_tokenizer
from spi.prompts import chat_prompt_ids
from spi.value import ValueExample, fit_value, load_value_model, new_value_model
from spi.value_fit_distributed import FitJob, launch_value_fit
from spi.value_train import TrainSettings

FIT = dict(epochs=2, learning_rate=1e-3, batch_size=4, weight_decay=0.0, holdout_fraction=0.0, seed=3)


def _examples(tokenizer, count=8):
    generator = torch.Generator().manual_seed(1)
    prompts = ["Give three tips for saving money.", "What is the capital of France?", "Write a haiku about rain."]
    return [ValueExample(chat_prompt_ids(tokenizer, prompts[i % 3]),
                         torch.randint(100, 5000, (3 + i % 4,), generator=generator).tolist(),
                         float(i % 3) - 1.0, f"p{i}") for i in range(count)]


def _fit_here(examples, pad, micro, dtype="float32", master="float32", **overrides):
    torch.manual_seed(0)
    model = new_value_model("backbone", None, "tiny-llama", "tiny-llama", dtype=dtype)
    fit_value(model, examples, pad, None, **{**FIT, **overrides},
              train=TrainSettings(micro_batch_size=micro, master_dtype=master))
    return model


def test_two_processes_train_the_same_head_as_one(tmp_path):
    tokenizer = load_tokenizer("tiny-llama")
    examples, pad = _examples(tokenizer), tokenizer.pad_token_id
    one = _fit_here(examples, pad, micro=2)  # effective batch 4 = 2 x 2 accumulation x 1 process
    job = FitJob("tiny-llama", "tiny-llama", pad, processes=2, device="cpu", micro_batch_size=2, **FIT)
    two = load_value_model(launch_value_fit(job, examples, tmp_path / "v"))  # 2 x 1 x 2 processes
    assert torch.allclose(two.head.weight, one.head.weight, atol=1e-5, rtol=1e-4)
    assert torch.allclose(two.head.bias, one.head.bias, atol=1e-5)
    start = load_value_model(new_value_model("backbone", None, "tiny-llama", "tiny-llama").save(tmp_path / "start"))
    name, weight = next(iter(two.backbone.named_parameters()))
    moved = (weight - dict(start.backbone.named_parameters())[name]).abs().max()
    assert moved > 1e-4  # the backbone trained, in both
    assert torch.allclose(weight, dict(one.backbone.named_parameters())[name], atol=1e-5)
    assert two.report.train_sequences == len(examples)
    # the cost counts both processes: the same training tokens; each computed the first step's statistics
    first_step = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples[:FIT["batch_size"]])
    assert two.report.backward_tokens == one.report.backward_tokens > 0
    assert two.report.forward_tokens == one.report.forward_tokens + first_step


def test_micro_batches_accumulate_to_the_full_batch():
    tokenizer = load_tokenizer("tiny-llama")
    examples, pad = _examples(tokenizer), tokenizer.pad_token_id
    whole, micro = _fit_here(examples, pad, micro=None), _fit_here(examples, pad, micro=1)
    assert torch.allclose(whole.head.weight, micro.head.weight, atol=1e-5, rtol=1e-4)
    assert whole.report.final_loss == pytest.approx(micro.report.final_loss, rel=1e-4)
    with pytest.raises(ValueError, match="value.batch_size .4. must be a multiple of value.micro_batch_size .3."):
        _fit_here(examples, pad, micro=3)


def test_float32_master_weights_keep_small_bfloat16_updates():
    """lr 2e-4 is below half a bfloat16 step of most weights (std 0.4): pure bfloat16 AdamW rounds most
    updates of the transformer layers away, float32 master weights accumulate them into changes
    that survive the cast back to bfloat16."""
    tokenizer = load_tokenizer("tiny-llama")
    examples, pad = _examples(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(0)
    start = new_value_model("backbone", None, "tiny-llama", "tiny-llama", dtype="bfloat16").backbone
    start = {k: v.clone() for k, v in start.state_dict().items() if k.startswith("layers.")}  # embedding rows of unseen tokens get no gradient
    changed = {}
    for master in ("float32", "model"):
        model = _fit_here(examples, pad, micro=None, dtype="bfloat16", master=master, epochs=10, learning_rate=2e-4)
        weights = model.backbone.state_dict()
        assert all(weights[k].dtype == torch.bfloat16 for k in start)  # back in the loaded dtype
        changed[master] = sum(int((weights[k] != start[k]).sum()) for k in start) / sum(v.numel() for v in start.values())
    assert changed["float32"] > 0.4  # measured: 0.54 of the layer weights moved, 0.12 in pure bfloat16
    assert changed["model"] < 0.5 * changed["float32"]


def _llama_reward_model(folder):
    from transformers import LlamaForSequenceClassification

    from spi.models import resolve

    tokenizer = load_tokenizer("tiny-llama")
    config = LlamaForSequenceClassification.config_class.from_pretrained(str(resolve("tiny-llama")))
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(5)
    scorer = LlamaForSequenceClassification(config)
    scorer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return scorer.eval()


def test_value_starts_from_the_reward_model(tmp_path):
    scorer = _llama_reward_model(tmp_path / "rm")
    tokenizer = load_tokenizer("tiny-llama")
    examples = _examples(tokenizer, 4)
    model = new_value_model("backbone", None, "tiny-llama", str(tmp_path / "rm"),
                            init_from_reward=True)
    fit_value(model, examples, tokenizer.pad_token_id, None, **{**FIT, "epochs": 0})  # initialisation only
    for e in examples:
        ids = e.prompt_ids + e.response_ids
        with torch.no_grad():
            expected = scorer(input_ids=torch.tensor([ids])).logits[0, 0]
            got = model.score_sequences([ids], tokenizer.pad_token_id)[0]
        assert float(got) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("value, message", [
    ({"kind": "policy-head", "device": "cuda:1"}, "value.device applies to the backbone kind"),
    ({"kind": "backbone", "backbone": "tiny-llama", "batch_size": 16, "micro_batch_size": 3, "processes": 2},
     r"value.batch_size \(16\) must be a multiple of value.micro_batch_size \(3\) x value.processes \(2\)"),
    ({"kind": "policy-head", "processes": 2}, "need value.kind 'backbone'"),
])
def test_recipe_refuses_value_settings_that_cannot_run(value, message):
    from spi.config import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe({"name": "x", "value": value})


def test_recipe_places_each_model():
    from spi.config import parse_recipe

    recipe = parse_recipe({"name": "x", "policy": {"device": "cuda:0", "dtype": "bfloat16"},
                           "reward": {"kind": "hf-classifier", "device": "cuda:1", "dtype": "bfloat16"},
                           "value": {"kind": "backbone", "backbone": "tiny-llama", "device": "cuda:2",
                                     "batch_size": 256, "micro_batch_size": 1, "processes": 4}})
    assert (recipe.reward.device, recipe.value.device, recipe.value.dtype) == ("cuda:1", "cuda:2", None)
    assert recipe.reward.max_length is None and recipe.value.master_dtype == "float32"
