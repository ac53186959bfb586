"""Properties the decode benchmark relies on: fixed-length decoding, guided = plain where it must be,
and results that do not depend on the batch (float32)."""

from dataclasses import replace

import pytest
import torch

from spi.guides import Guide, HeadValueGuide, WeightedGuide
from spi.search import SearchSettings, search
from spi.value import new_value_model

INSTRUCTIONS = ["Give three tips for saving money.", "What is the capital of France?",
                "Write a haiku about rain.", "Explain photosynthesis briefly.",
                "How do I boil an egg?", "Name a prime number above 100.",
                "Why is the sky blue?", "Suggest a name for a cat."]
SEEDS = list(range(100, 108))
BASE = SearchSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, batch_prompts=8)


def _head(policy, seed=None):
    value = new_value_model("policy-head", policy.model, policy.name)
    if seed is not None:
        torch.manual_seed(seed)
        torch.nn.init.normal_(value.head.weight)
    return WeightedGuide([(HeadValueGuide(value), 1.0)])


def test_ignore_eos_gives_fixed_length_without_eos(tiny):
    settings = replace(BASE, width=1, successors=3, ignore_eos=True)
    out = search(tiny, INSTRUCTIONS[:3], SEEDS[:3], settings, progress=False)
    assert out.compute.generated_tokens == 3 * 3 * 16
    for r in out.results:
        assert all(len(ids) == 16 and not set(ids) & set(tiny.eos_ids) for ids in r.response_ids)


def test_cbs_with_constant_value_follows_plain_sampling(tiny):
    """A constant value ranks rows in their sampled order, so row 0 of every prompt keeps its own lineage:
    its leaf is plain sampling's row 0 token for token, and every other leaf shares it up to the last
    boundary (each chunk restarts from row 0's prefix with the cache reordered)."""
    plain = search(tiny, INSTRUCTIONS[:4], SEEDS[:4], replace(BASE, width=1, successors=4, ignore_eos=True),
                   progress=False)
    cbs = search(tiny, INSTRUCTIONS[:4], SEEDS[:4],
                 replace(BASE, width=1, successors=4, chunk_length=4, ignore_eos=True, final_pick="value"),
                 guide=_head(tiny), progress=False)
    for p, c in zip(plain.results, cbs.results, strict=True):
        assert c.response_ids[0] == p.response_ids[0]
        assert all(leaf[:12] == p.response_ids[0][:12] for leaf in c.response_ids)
        assert len({tuple(leaf) for leaf in c.response_ids}) > 1  # rows did continue with their own draws
        assert c.chosen == 0 and c.beam_changes == 0
    assert cbs.compute.generated_tokens == plain.compute.generated_tokens
    assert cbs.compute.value_tokens == 0


class _LastTokenGuide(Guide):
    """V(row) = the row's last token id mod 7: exact in any batch, so selection cannot flip on rounding."""

    needs_last_logprob = False

    def score(self, boundary):
        return torch.tensor([float(r[-1] % 7) if r else 0.0 for r in boundary.responses])


def test_one_prompt_alone_equals_same_prompt_in_batch_of_eight(tiny):
    """Batch-composition independence in float32: a prompt decoded alone gives the same tokens, beams and
    answer as the same prompt in a batch of eight (prompts of different lengths, so different padding; 1,
    2 and 4 rows, so row counts off MKL's 4-row blocks), and the policy-head values agree to float32
    rounding. The values are not bit-identical on every CPU: on AVX-512 Xeons the GEMM kernel depends on
    the row count (seen here: 3.6530743 vs 3.6530774), so selection is checked with an exact guide."""
    for width, successors in [(1, 1), (1, 2), (2, 2)]:
        settings = replace(BASE, width=width, successors=successors, chunk_length=4)
        for guide in (_head(tiny, 0), _LastTokenGuide()):
            together = search(tiny, INSTRUCTIONS, SEEDS, settings, guide=guide, progress=False).results
            for i in (0, 3, 7):
                alone = search(tiny, INSTRUCTIONS[i:i + 1], SEEDS[i:i + 1], replace(settings, batch_prompts=1),
                               guide=guide, progress=False).results[0]
                if isinstance(guide, _LastTokenGuide):
                    assert alone.response_ids == together[i].response_ids, (width, successors, i)
                    assert alone.leaf_values == together[i].leaf_values
                    assert alone.chosen == together[i].chosen
                elif width == 1:  # no value-based selection: same tokens, values to rounding
                    assert alone.response_ids == together[i].response_ids, (width, successors, i)
                    assert alone.leaf_values == pytest.approx(together[i].leaf_values, rel=1e-4, abs=1e-4)


def test_batch_order_does_not_change_results(tiny):
    settings = replace(BASE, width=2, successors=2, chunk_length=4)
    forward = search(tiny, INSTRUCTIONS, SEEDS, settings, guide=_head(tiny, 1), progress=False).results
    order = [5, 2, 7, 0, 1, 6, 3, 4]
    shuffled = search(tiny, [INSTRUCTIONS[i] for i in order], [SEEDS[i] for i in order], settings,
                      guide=_head(tiny, 1), progress=False).results
    for j, i in enumerate(order):
        assert shuffled[j].instruction == INSTRUCTIONS[i]
        assert shuffled[j].response_ids == forward[i].response_ids
        assert shuffled[j].leaf_values == forward[i].leaf_values
