"""The vllm backend (spi.vllm_search) through the part of vLLM's ``LLM.generate`` contract it uses, served
by the real tiny transformers policy: a fake engine, real tokens. The last test runs a real vLLM engine
and is skipped where vLLM or a GPU is missing."""

import hashlib
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch

from spi import backends
from spi.compute import Compute
from spi.guides import (
    CachedValueGuide,
    Guide,
    HeadValueGuide,
    ImplicitRewardGuide,
    Prefixes,
    ReencodeValueGuide,
    TokenLogProbGuide,
    WeightedGuide,
)
from spi.prompts import chat_prompt_ids
from spi.sampling import row_uniforms, sample_tokens
from spi.search import SearchSettings, search

INSTRUCTIONS = ["Give three tips for saving money.", "Write a haiku about rain.", "Why is the sky blue?"]
SEEDS = [7, 8, 9]
BASE = SearchSettings(temperature=1.0, top_k=0, top_p=0.95, max_new_tokens=10, batch_prompts=8)


@dataclass
class Params:
    """The ``vllm.SamplingParams`` fields that spi.vllm_search sets."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: list | None
    ignore_eos: bool


class TransformersEngine:
    """``LLM.generate(prompts, sampling_params)`` on a transformers model (no cache); records each request
    as (prompt ids, params, output ids)."""

    def __init__(self, policy):
        self.model, self.tokenizer, self.requests = policy.model, policy.tokenizer, []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert len(prompts) == len(sampling_params)
        results = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            ids = list(prompt["prompt_token_ids"])
            outputs = [self._complete(ids, params, params.seed + i) for i in range(params.n)]
            self.requests.append((ids, params, [o.token_ids for o in outputs]))
            results.append(SimpleNamespace(prompt_token_ids=ids, outputs=outputs))
        return results

    @torch.no_grad()
    def _complete(self, ids, params, seed):
        uniforms, out, stop = row_uniforms(seed, 1, params.max_tokens), [], set(params.stop_token_ids or [])
        finish = "length"
        for t in range(params.max_tokens):
            logits = self.model(torch.tensor([ids + out])).logits[:, -1].float()
            token = sample_tokens(logits, uniforms[:, t], params.temperature, max(params.top_k, 0), params.top_p)
            out.append(int(token))
            if out[-1] in stop:
                finish = "stop"
                break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return SimpleNamespace(token_ids=out, text=text, finish_reason=finish)


def _hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


class TokenHashGuide(Guide):
    """A deterministic score of a row's tokens, recording every call: selection can be recomputed."""

    needs_last_logprob = False

    def __init__(self):
        self.calls = []  # (instructions, responses, scores) per score_prefixes call

    def score_prefixes(self, prefixes):
        responses = [list(r) for r in prefixes.responses]
        scores = torch.tensor([_hash(str(r)) for r in responses])
        self.calls.append((list(prefixes.instructions), responses, scores))
        return scores


class HashReward:
    def __init__(self):
        self.calls = 0

    def score(self, instructions, responses):
        self.calls += 1
        return [_hash(x + "|" + y) for x, y in zip(instructions, responses, strict=True)]


def _run(policy, settings, guide=None, reward=None, instructions=INSTRUCTIONS, seeds=SEEDS):
    engine = TransformersEngine(policy)
    out = backends.VLLMBackend(engine=engine, sampling_params=Params).search(
        policy, instructions, seeds, settings, guide, reward_model=reward)
    return out, engine


def _strip(ids, eos):
    return ids[:-1] if ids and ids[-1] in eos else ids


def test_best_of_n_returns_k_leaves_and_picks_the_max_reward_leaf(tiny):
    settings = replace(BASE, width=1, successors=4, chunk_length=None, final_pick="reward")
    reward = HashReward()
    out, engine = _run(tiny, settings, reward=reward)
    assert len(engine.requests) == 3 * 4  # one chunk: four n=1 requests per prompt, all from the prompt
    for r, x in zip(out.results, INSTRUCTIONS, strict=True):
        prompt = chat_prompt_ids(tiny.tokenizer, x)
        mine = [(ids, p, o[0]) for ids, p, o in engine.requests if ids == prompt]
        assert len(mine) == 4 and all(p.max_tokens == settings.max_new_tokens for _, p, _ in mine)
        assert len({p.seed for _, p, _ in mine}) == 4
        assert r.response_ids == [_strip(o, tiny.eos_ids) for _, _, o in mine]
        assert r.responses == tiny.tokenizer.batch_decode(r.response_ids, skip_special_tokens=True)
        assert r.leaf_rewards == [_hash(x + "|" + y) for y in r.responses]
        assert r.chosen == max(range(4), key=lambda i: (r.leaf_rewards[i], -i)) and r.boundaries == 0
    assert out.compute.generated_tokens == sum(len(o[0]) for _, _, o in engine.requests)
    assert out.compute.reward_calls == 12 and reward.calls == 1


def _expected_kept(responses, scores, width, successors):
    """Brute force: the W best distinct rows (ties to the earlier row), each K times."""
    order = sorted(range(len(responses)), key=lambda i: (-float(scores[i]), i))
    distinct, repeats, seen = [], [], set()
    for i in order:
        (repeats if tuple(responses[i]) in seen else distinct).append(i)
        seen.add(tuple(responses[i]))
    return [responses[i] for i in (distinct + repeats)[:width] for _ in range(successors)]


def _by_prompt(call, rows):
    instructions, responses, scores = call
    return {instructions[i]: (responses[i:i + rows], scores[i:i + rows]) for i in range(0, len(responses), rows)}


def test_kept_beams_are_the_top_scored_rows_and_chunks_resubmit_prompt_plus_kept_prefix(tiny):
    w, k, length = 2, 3, 3
    settings = replace(BASE, width=w, successors=k, chunk_length=length, final_pick="value")
    guide = TokenHashGuide()
    out, engine = _run(tiny, settings, guide)
    rows, calls = w * k, [_by_prompt(c, w * k) for c in guide.calls]
    final = calls[-1]
    for r, x in zip(out.results, INSTRUCTIONS, strict=True):
        seen = [c[x] for c in calls if x in c]  # every boundary of this prompt, then its leaves
        assert r.boundaries == len(seen) - 1 >= 1
        for (before, scores), (after, _) in zip(seen, seen[1:], strict=False):
            expected = _expected_kept(before, scores, w, k)
            assert [a[:len(e)] for a, e in zip(after, expected, strict=True)] == expected
        leaves = final[x][0]
        assert r.response_ids == [_strip(leaf, tiny.eos_ids) for leaf in leaves]
        assert r.leaf_values == pytest.approx(final[x][1].tolist())
        assert r.chosen == max(range(rows), key=lambda i: (r.leaf_values[i], -i))
        # submissions: the chat prompt + a prefix of a whole number of chunks, grown L at a time
        prompt = chat_prompt_ids(tiny.tokenizer, x)
        mine = [(ids[len(prompt):], p) for ids, p, _ in engine.requests if ids[:len(prompt)] == prompt]
        prefixes = [prefix for prefix, _ in mine]
        for prefix, p in mine:
            assert len(prefix) % length == 0 and p.max_tokens == min(length, settings.max_new_tokens - len(prefix))
            assert not prefix or prefix[:-length] in prefixes
            assert not set(prefix) & set(tiny.eos_ids)  # an ended row is never continued
        for leaf in leaves:
            assert all(leaf[:c] in prefixes for c in range(0, len(leaf), length))
    assert out.compute.generated_tokens == sum(len(o[0]) for _, _, o in engine.requests)
    assert out.compute.policy_tokens == sum(len(ids) + len(o[0]) for ids, _, o in engine.requests)
    again, _ = _run(tiny, settings, TokenHashGuide())  # seeds own the randomness: the same leaves
    assert [r.response_ids for r in again.results] == [r.response_ids for r in out.results]


class EndedFirstGuide(TokenHashGuide):
    """TokenHashGuide, plus 10 for a row that ended with ``eos``: ended rows are kept."""

    def __init__(self, eos):
        super().__init__()
        self.eos = eos

    def score_prefixes(self, prefixes):
        ended = torch.tensor([float(bool(r) and r[-1] == self.eos) for r in prefixes.responses])
        return super().score_prefixes(prefixes) + 10 * ended


def test_eos_stops_a_beam_and_an_ended_beam_is_kept_unchanged(tiny):
    settings = replace(BASE, width=2, successors=2, chunk_length=3, final_pick="value")
    _, first = _run(tiny, settings, TokenHashGuide())
    start, eos = first.requests[0][2][0][:2]  # prompt 0's first row: make its second token the EOS
    policy = SimpleNamespace(name=tiny.name, model=tiny.model, tokenizer=tiny.tokenizer, eos_ids=[eos],
                             prompt_ids=tiny.prompt_ids)
    guide = EndedFirstGuide(eos)
    out, engine = _run(policy, settings, guide)
    leaves = _by_prompt(guide.calls[-1], 4)[INSTRUCTIONS[0]][0]
    assert leaves[:2] == [[start, eos]] * 2  # ended after 2 tokens, kept (tiled K=2), never extended
    assert out.results[0].response_ids[:2] == [[start]] * 2  # the EOS is stripped from the answer
    assert out.results[0].responses[0] == tiny.tokenizer.decode([start], skip_special_tokens=True)
    assert all(eos not in leaf[:-1] for c in guide.calls for leaf in c[1])  # generation stops at an EOS
    assert all(eos not in ids for ids, _, _ in engine.requests)  # an ended row is never re-submitted
    assert all(p.stop_token_ids == [eos] for _, p, _ in engine.requests)


@pytest.fixture(scope="module")
def head_guide(tiny):
    from spi.value import new_value_model

    value = new_value_model("policy-head", tiny.model, tiny.name)
    torch.manual_seed(0)
    torch.nn.init.normal_(value.head.weight)
    return HeadValueGuide(value)


def test_score_prefixes_equals_the_transformers_search_scores(tiny, head_guide):
    from spi.models import CausalLM
    from spi.value import new_value_model

    untuned, pad = CausalLM.load("tiny-llama-b"), tiny.tokenizer.pad_token_id
    backbone = new_value_model("backbone", tiny.model, tiny.name, "tiny-llama-b").eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(backbone.head.weight)
    guides = [head_guide, ImplicitRewardGuide(tiny.model, untuned.model, pad), CachedValueGuide(backbone, pad),
              ReencodeValueGuide(backbone, tiny.tokenizer)]
    settings = replace(BASE, width=1, successors=3, final_pick="value", max_new_tokens=6)
    (eos,) = tiny.eos_ids
    for guide in guides:
        results = search(tiny, INSTRUCTIONS[:2], SEEDS[:2], settings, guide, progress=False).results
        rows = [(r.instruction, ids + ([eos] if len(ids) < settings.max_new_tokens else []))
                for r in results for ids in r.response_ids]
        prefixes = Prefixes([x for x, _ in rows], [chat_prompt_ids(tiny.tokenizer, x) for x, _ in rows],
                            [ids for _, ids in rows], Compute(), tiny.tokenizer.pad_token_id, tiny.model)
        expected = torch.tensor([v for r in results for v in r.leaf_values])
        assert torch.allclose(guide.score_prefixes(prefixes), expected, rtol=1e-4, atol=1e-4), type(guide).__name__


def test_cbs_with_a_value_head_guide_reads_the_transformers_policy(tiny, head_guide):
    settings = replace(BASE, width=2, successors=2, chunk_length=4, final_pick="value", max_new_tokens=8)
    guide = WeightedGuide([(head_guide, 2.0)])
    out, _ = _run(tiny, settings, guide, instructions=INSTRUCTIONS[:1], seeds=SEEDS[:1])
    (r,) = out.results
    assert len(r.responses) == 4 and r.boundaries == 1 and out.compute.value_calls == 8
    with pytest.raises(ValueError, match="hidden states"):
        head_guide.score_prefixes(Prefixes(["x"], [[1]], [[2]], Compute(), 0))


def test_unsupported_guides_and_proposals_are_refused_before_generating(tiny):
    engine = TransformersEngine(tiny)
    backend = backends.VLLMBackend(engine=engine, sampling_params=Params)
    args = WeightedGuide([(TokenLogProbGuide(), 1.0), (TokenHashGuide(), 1.0)])
    with pytest.raises(ValueError, match="TokenLogProbGuide cannot score token prefixes"):
        backend.search(tiny, INSTRUCTIONS, SEEDS, replace(BASE, successors=2, chunk_length=2), args)
    with pytest.raises(ValueError, match="topk"):
        backend.search(tiny, INSTRUCTIONS, SEEDS, replace(BASE, successors=2, proposal="topk"))
    assert engine.requests == []


def test_on_a_real_vllm_engine():
    reason = backends.vllm_unavailable_reason()
    if reason:
        pytest.skip(f"vLLM backend not testable here: {reason}")
    from spi.models import CausalLM  # pragma: no cover - needs vLLM and a GPU

    policy = CausalLM.load("smollm2-135m-instruct")  # head_dim 64: every vLLM attention backend takes it
    backend = backends.VLLMBackend(dtype="float32", gpu_memory_utilization=0.3)
    settings = replace(BASE, width=2, successors=2, chunk_length=4, final_pick="value", max_new_tokens=12)
    out = backend.search(policy, INSTRUCTIONS, SEEDS, settings, TokenHashGuide())
    assert [len(r.responses) for r in out.results] == [4, 4, 4]
    assert all(r.boundaries >= 1 for r in out.results if any(len(ids) > 4 for ids in r.response_ids))
    assert out.compute.generated_tokens >= sum(len(ids) for r in out.results for ids in r.response_ids)
