"""Equivalences of the one search routine, in float32 on a random tiny Llama."""

from dataclasses import replace

import torch

from spi.compute import Compute
from spi.guides import Guide, HeadValueGuide, WeightedGuide
from spi.incremental import IncrementalModel
from spi.prompts import chat_prompt_ids
from spi.sampling import row_uniforms, sample_tokens
from spi.search import SearchSettings, search
from spi.value import new_value_model

SETTINGS = SearchSettings(temperature=1.0, top_k=0, top_p=0.95, max_new_tokens=12, batch_prompts=8)


def _random_head_guide(tiny, seed=0):
    value = new_value_model("policy-head", tiny.model, tiny.name)
    torch.manual_seed(seed)
    torch.nn.init.normal_(value.head.weight)
    return WeightedGuide([(HeadValueGuide(value), 1.0)])


def _reference_sampling(tiny, instruction, seed, rows, settings):
    """Plain sampling without a KV cache: the full sequence is recomputed for every token."""
    uniforms = row_uniforms(seed, rows, settings.max_new_tokens)
    prompt = chat_prompt_ids(tiny.tokenizer, instruction)
    out = []
    for row in range(rows):
        ids = list(prompt)
        for t in range(settings.max_new_tokens):
            with torch.no_grad():
                logits = tiny.model(torch.tensor([ids])).logits[:, -1].float()
            token = int(sample_tokens(logits, uniforms[row:row + 1, t], settings.temperature, settings.top_k, settings.top_p))
            ids.append(token)
            if token in tiny.eos_ids:
                break
        response = ids[len(prompt):]
        out.append(response[:-1] if response and response[-1] in tiny.eos_ids else response)
    return out


def test_plain_sampling_equals_uncached_reference(tiny, instructions):
    settings = replace(SETTINGS, width=1, successors=3)
    result = search(tiny, instructions[:2], [11, 12], settings, progress=False).results
    for r, instruction, seed in zip(result, instructions[:2], [11, 12], strict=True):
        assert r.response_ids == _reference_sampling(tiny, instruction, seed, 3, settings)


def test_best_of_n_setting_equals_sampling_sample_for_sample(tiny, instructions):
    """(W=1, K=N, L=None) with a guide is Best-of-N: the guide only picks, it never changes a sample."""
    n = 4
    bon = replace(SETTINGS, width=1, successors=n, chunk_length=None, final_pick="value")
    plain = replace(SETTINGS, width=1, successors=n)
    guided = search(tiny, instructions[:3], [1, 2, 3], bon, guide=_random_head_guide(tiny), progress=False)
    sampled = search(tiny, instructions[:3], [1, 2, 3], plain, progress=False)
    for g, s in zip(guided.results, sampled.results, strict=True):
        assert g.response_ids == s.response_ids
        assert g.chosen == max(range(n), key=lambda i: (g.leaf_values[i], -i))


def test_single_row_equals_plain_sampling(tiny, instructions):
    one = replace(SETTINGS, width=1, successors=1, chunk_length=4)
    guided = search(tiny, instructions[:2], [5, 6], one, guide=_random_head_guide(tiny), progress=False)
    plain = search(tiny, instructions[:2], [5, 6], replace(SETTINGS, width=1, successors=1), progress=False)
    assert [r.response_ids for r in guided.results] == [r.response_ids for r in plain.results]


def test_batch_composition_does_not_change_results(smollm2, instructions):
    """One prompt alone gives the same leaves as the same prompt in a batch of eight (float32).

    Runs on the real policy: a random tiny model's near-uniform next-token distributions make
    float32 rounding differences between batch shapes (about 1e-5 in the logits) flip samples."""
    settings = SearchSettings(width=2, successors=2, chunk_length=4, temperature=0.6, top_k=50, top_p=0.9,
                              max_new_tokens=12, batch_prompts=8)
    seeds = list(range(100, 108))
    together = search(smollm2, instructions, seeds, settings, guide=_random_head_guide(smollm2), progress=False)
    for i in (0, 3, 7):
        alone = search(smollm2, instructions[i:i + 1], seeds[i:i + 1], replace(settings, batch_prompts=1),
                       guide=_random_head_guide(smollm2), progress=False)
        assert alone.results[0].response_ids == together.results[i].response_ids
        assert alone.results[0].chosen == together.results[i].chosen


class _TokenSumGuide(Guide):
    """V(row) = sum of (token id mod 101) over the response so far: a known function of the tokens. It
    records every boundary's rows and scores and the selection that followed."""

    needs_last_logprob = False

    def __init__(self):
        self.boundaries = []  # [rows' responses, scores, index of the rows kept]

    def score(self, boundary):
        rows = [tuple(r) for r in boundary.responses]
        scores = torch.tensor([float(sum(t % 101 for t in r)) for r in rows])
        self.boundaries.append([rows, scores, None])
        return scores

    def reorder(self, index):
        super().reorder(index)
        self.boundaries[-1][2] = index.tolist()


def test_guided_search_selects_by_value(tiny, instructions):
    """At every boundary the W kept rows of a prompt are its highest-valued distinct rows, each tiled K
    times; the next chunk continues exactly those rows, and the answer is the highest-valued leaf."""
    settings = replace(SETTINGS, width=2, successors=3, chunk_length=2, max_new_tokens=10, top_p=1.0)
    guide = _TokenSumGuide()
    result = search(tiny, instructions[:4], [7, 8, 9, 10], settings, guide=guide, progress=False)
    rows, width, k = settings.rows, settings.width, settings.successors
    # selection after tokens 2, 4, 6 and 8, then the leaves' final scores
    assert [b[2] is not None for b in guide.boundaries] == [True, True, True, True, False]
    for (responses, scores, index), (after, _, _) in zip(guide.boundaries, guide.boundaries[1:], strict=False):
        for p in range(4):
            group = range(p * rows, (p + 1) * rows)
            kept = index[p * rows:(p + 1) * rows:k]
            assert len(kept) == width and len(set(kept)) == width
            assert index[p * rows:(p + 1) * rows] == [row for row in kept for _ in range(k)]
            assert scores[kept[0]] == max(scores[i] for i in group)
            others = [i for i in group if responses[i] != responses[kept[0]]]
            assert scores[kept[1]] == max(scores[i] for i in others)
            for j, row in enumerate(index[p * rows:(p + 1) * rows]):  # the next chunk extends the kept rows
                assert after[p * rows + j][:len(responses[row])] == responses[row]
    assert sum(r.beam_changes for r in result.results) > 0  # the value overruled the first-sampled row
    for r in result.results:
        assert r.leaf_values == [float(sum(t % 101 for t in ids)) for ids in r.response_ids]
        assert r.chosen == max(range(rows), key=lambda i: (r.leaf_values[i], -i))


class _EndedFirstGuide(Guide):
    """Scores a row by whether it has ended (then shorter is better): selection keeps ended rows."""

    needs_last_logprob = False

    def __init__(self, eos_ids):
        self.eos = set(eos_ids)

    def score(self, boundary):
        rows = list(boundary.responses)
        return torch.tensor([(100.0 if r and r[-1] in self.eos else 0.0) - len(r) for r in rows])


def test_search_ends_cleanly_when_selection_keeps_only_rows_that_ended_earlier(tiny, instructions):
    """Rows that ended before a boundary are selected over running ones; every row has then ended
    before the last boundary, and the final values are the scores of that boundary."""
    half_vocab = list(range(0, tiny.model.config.vocab_size, 2))  # "EOS" half the time: rows end early
    policy = type("HalfVocabEos", (type(tiny),), {"eos_ids": half_vocab})(tiny.name, tiny.model, tiny.tokenizer)
    settings = replace(SETTINGS, width=1, successors=4, chunk_length=3, max_new_tokens=12, top_p=1.0)
    result = search(policy, instructions[:1], [5], settings, guide=_EndedFirstGuide(half_vocab), progress=False)
    (only,) = result.results
    assert all(len(ids) <= 3 for ids in only.response_ids)  # an ended row won the first boundary
    assert len(only.leaf_values) == 4 and all(v > 0 for v in only.leaf_values)


def test_cache_reorder_matches_recompute(tiny, instructions):
    prompts = [chat_prompt_ids(tiny.tokenizer, x) for x in instructions[:2]]
    model = IncrementalModel(tiny.model, Compute(), "policy_tokens", "policy_forward")
    with torch.no_grad():
        model.prefill(prompts, 3, tiny.tokenizer.pad_token_id)
        sequences = [list(prompts[i // 3]) for i in range(6)]
        for step in range(3):
            tokens = torch.tensor([[100 + 7 * i + step] for i in range(6)])
            model.feed(tokens, torch.ones_like(tokens, dtype=torch.bool))
            for i in range(6):
                sequences[i].append(int(tokens[i, 0]))
        index = torch.tensor([5, 0, 2, 2, 1, 4])
        model.reorder(index)
        sequences = [list(sequences[i]) for i in index.tolist()]
        last = torch.tensor([[300 + i] for i in range(6)])
        logits = model.logits(model.feed(last, torch.ones_like(last, dtype=torch.bool))[:, -1])
        for i in range(6):
            full = tiny.model(torch.tensor([sequences[i] + [300 + i]])).logits[0, -1].float()
            torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)


def test_selection_leaves_a_prompt_whose_rows_all_ended_alone():
    """Rows of prompt 0 all ended: its rows stay as they are (decoded alone, its search would have
    stopped); prompt 1 is still running and is selected by score (W=1: its best row, K times)."""
    from spi.search import SearchSettings, _select

    settings = SearchSettings(width=1, successors=2, chunk_length=2)
    scores = torch.tensor([0.0, 5.0, 1.0, 3.0])
    responses = [(1,), (2,), (3,), (4,)]
    finished = torch.tensor([True, True, False, True])
    index, changed = _select(scores, responses, 2, settings, [0, 1], 1, finished)
    assert index.tolist() == [0, 1, 3, 3]
    assert changed == [None, True]
    index, changed = _select(scores, responses, 2, settings, [0, 1], 1)  # no finished mask: both select
    assert index.tolist() == [1, 1, 3, 3] and changed == [True, True]
