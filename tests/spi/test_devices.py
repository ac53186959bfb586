"""Every tensor of the search, the guides, the value fit and the reward follows the recipe's device.

No GPU is needed. The recipe's device here is ``meta``, made runnable by a dispatch mode (``OnDevice``):
moving a tensor to ``meta``, or creating one there, gives a tensor that reports device ``meta`` but
holds real CPU data, so the code runs for real and its results can be compared with a plain CPU run. The
mode records a violation whenever
- an op mixes ``meta`` tensors with CPU tensors of one or more dimensions (what CUDA refuses, or moves
  silently: a CPU mask in ``torch.where``, CPU random numbers times device logits), except
  the explicit transfers ``_to_copy``/``copy_`` (PyTorch itself moves CPU indices of an index op);
- a matrix product or embedding runs on CPU tensors only (a model left on the CPU);
- code creates a ``meta`` tensor from data (``torch.tensor(data, device=...)`` bypasses dispatch and would
  lose the data here: the code moves a CPU tensor instead, which is as cheap on a GPU).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

import spi.models
from spi.guides import CachedValueGuide, ImplicitRewardGuide, RewardGuide, TokenLogProbGuide, WeightedGuide
from spi.models import CausalLM, load_causal_lm, model_device
from spi.reward import ClassifierReward
from spi.search import SearchSettings, search
from spi.systems import value_guide
from spi.value import ValueExample, fit_value, new_value_model

DEVICE = torch.device("meta")
aten = torch.ops.aten
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._has_compatible_shallow_copy_type.default}
HEAVY = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.embedding.default}


class OnDevice(torch.Tensor):
    """A CPU tensor that reports device ``meta``."""

    @staticmethod
    def __new__(cls, elem):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), dtype=elem.dtype,
                                                device=DEVICE, requires_grad=elem.requires_grad,
                                                storage_offset=elem.storage_offset())
        t.elem = elem
        return t

    def tolist(self):  # a device-to-host read, as on a GPU (tolist does not dispatch)
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # DeviceCheck handles every op


class DeviceCheck(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_device = [a for a in tensors if a.device == DEVICE]
        on_cpu = [a for a in tensors if a.device.type == "cpu" and a.dim() > 0]
        if on_device and on_cpu and func not in TRANSFERS:
            self.violations.append(f"{func}: CPU tensors {[tuple(a.shape) for a in on_cpu]} mixed with {DEVICE}")
        if func in HEAVY and tensors and not on_device:
            self.violations.append(f"{func} ran on the CPU: a model was left off {DEVICE}")
        # the device an op is asked for (a keyword of factories and _to_copy, positional in to.device)
        target = kwargs.get("device") or next((a for a in args if isinstance(a, torch.device)), None)
        target = torch.device(target) if target is not None else None
        if target == DEVICE:
            args, kwargs = tree_map(_cpu_for_device, (args, kwargs))
        out = func(*tree_map(self._unwrap, args), **tree_map(self._unwrap, kwargs))
        if func is aten._local_scalar_dense.default:
            return out
        wrap = target == DEVICE or (bool(on_device) and target is None)
        with torch.inference_mode(False):  # a wrapper made in inference mode cannot be a view of one made outside
            return tree_map(lambda o: OnDevice(o) if wrap and isinstance(o, torch.Tensor) else o, out)

    def _unwrap(self, a):
        if isinstance(a, OnDevice):
            return a.elem
        if isinstance(a, torch.Tensor) and a.device == DEVICE:  # made by torch.tensor(data, device=meta)
            if a.numel():
                self.violations.append(f"a {tuple(a.shape)} tensor was created from data on {DEVICE} (data lost)")
            return torch.zeros(a.shape, dtype=a.dtype)
        return a


@pytest.fixture(autouse=True)
def _load_outside_the_check(monkeypatch):
    """transformers builds models on its own meta device while loading: load on the CPU outside the
    check (spi.models then places the model where it was asked, inside it)."""
    load = spi.models._from_pretrained

    def outside(*args, **kwargs):
        with _disable_current_modes():
            return load(*args, **kwargs)

    monkeypatch.setattr(spi.models, "_from_pretrained", outside)


def _cpu_for_device(a):
    return torch.device("cpu") if isinstance(a, (torch.device, str)) and str(a) == str(DEVICE) else a


def _on_device(model):
    """``model`` moved to the fake device (call inside DeviceCheck)."""
    model.to(DEVICE)
    assert model_device(model) == DEVICE
    return model


def _guides(policy, reward, pad):
    torch.manual_seed(0)
    head = new_value_model("policy-head", policy.model, policy.name)
    torch.nn.init.normal_(head.head.weight)
    backbone = new_value_model("backbone", policy.model, policy.name, backbone_name="tiny-llama",
                               device=str(model_device(policy.model)))
    torch.nn.init.normal_(backbone.head.weight)
    pair = [policy.model, load_causal_lm("tiny-llama-b", device=str(model_device(policy.model)))]
    return {
        "values": value_guide([head, backbone], [1.0, 2.0], policy),
        "cached": WeightedGuide([(CachedValueGuide(backbone.eval(), pad), 1.0)]),
        "w2s": ImplicitRewardGuide(*pair, pad),
        "args": WeightedGuide([(TokenLogProbGuide(), 1.0), (RewardGuide(reward, policy.tokenizer), 0.5)]),
    }


SETTINGS = {
    "values": SearchSettings(width=2, successors=2, chunk_length=3, max_new_tokens=7, temperature=1.0),
    "cached": SearchSettings(width=2, successors=2, chunk_length=4, max_new_tokens=6, selection="stochastic"),
    "w2s": SearchSettings(width=1, successors=3, chunk_length=2, max_new_tokens=5),
    "args": SearchSettings(width=1, successors=3, chunk_length=1, max_new_tokens=3, proposal="topk",
                           final_pick="value"),
}


def _decode_all(policy, reward, instructions):
    guides = _guides(policy, reward, policy.tokenizer.pad_token_id)
    with torch.inference_mode():
        return _decode(policy, reward, instructions, guides)


def _decode(policy, reward, instructions, guides):
    out = {}
    for name, settings in SETTINGS.items():
        results = search(policy, instructions[:3], [5, 6, 7], settings, guides[name], reward_model=reward,
                         progress=False).results
        out[name] = [(r.response_ids, r.chosen) for r in results]
    plain = search(policy, instructions[:3], [5, 6, 7], SearchSettings(width=1, successors=2, max_new_tokens=6),
                   reward_model=reward, progress=False).results
    out["best-of-n"] = [(r.response_ids, r.chosen, r.leaf_rewards) for r in plain]
    return out


def test_search_guides_and_reward_stay_on_the_recipe_device(instructions):
    expected = _decode_all(CausalLM.load("tiny-llama"), ClassifierReward("tiny-reward"), instructions)
    check = DeviceCheck()
    with check:  # models are placed outside inference mode (module.to inside it escapes the check)
        policy = CausalLM.load("tiny-llama", device=str(DEVICE))
        assert model_device(policy.model) == DEVICE
        reward = ClassifierReward("tiny-reward", device=str(DEVICE))
        assert model_device(reward.model) == DEVICE
        got = _decode_all(policy, reward, instructions)
    assert not check.violations, "\n".join(sorted(set(check.violations))[:20])
    assert got.keys() == expected.keys()
    for name in expected:  # same tokens as on the CPU: the device changes nothing but placement
        assert [g[:2] for g in got[name]] == [e[:2] for e in expected[name]], name
    assert got["best-of-n"][0][2] == pytest.approx(expected["best-of-n"][0][2], abs=1e-5)


def _examples(policy, instructions, count=8):
    from spi.prompts import chat_prompt_ids

    generator = torch.Generator().manual_seed(0)
    return [ValueExample(chat_prompt_ids(policy.tokenizer, instructions[i % 4]),
                         torch.randint(100, 2000, (5 + i % 3,), generator=generator).tolist(),
                         float(i % 4), str(i % 4)) for i in range(count)]


@pytest.mark.parametrize("kind, solver", [("backbone", "adam"), ("policy-head", "adam"), ("policy-head", "ridge")])
def test_value_fit_stays_on_the_recipe_device(instructions, kind, solver):
    def fit(device):
        policy = CausalLM.load("tiny-llama")
        if device == DEVICE:
            _on_device(policy.model)
        torch.manual_seed(0)
        model = new_value_model(kind, policy.model, policy.name, backbone_name="tiny-llama", device=str(device))
        report = fit_value(model, _examples(policy, instructions), policy.tokenizer.pad_token_id, policy.model,
                           epochs=2, batch_size=4, holdout_fraction=0.25, solver=solver, learning_rate=1e-3)
        return model, report

    _, expected = fit(torch.device("cpu"))
    check = DeviceCheck()
    with check:
        model, got = fit(DEVICE)
        assert model.head.weight.device == DEVICE
    assert not check.violations, "\n".join(sorted(set(check.violations))[:20])
    assert got.final_loss == pytest.approx(expected.final_loss, rel=1e-4)
    assert got.holdout_mse == pytest.approx(expected.holdout_mse, rel=1e-4)


def test_the_check_catches_a_cpu_mask_and_a_model_left_on_the_cpu():
    check = DeviceCheck()
    with check:
        tokens = torch.arange(6).to(DEVICE)
        torch.where(torch.ones(6, dtype=torch.bool), tokens, 0)  # the mask stayed on the CPU
        torch.nn.Linear(4, 4)(torch.zeros(2, 4))  # a layer never moved
    assert len(check.violations) == 2
    assert "mixed" in check.violations[0] and "left off" in check.violations[1]
