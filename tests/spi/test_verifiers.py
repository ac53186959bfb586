"""Verifiable constraints offline: punkt from a registry package, strict vs loose verdicts, the verifier reward."""

import json

import pytest

from spi import verifiers
from spi.config import RewardConfig
from spi.reward import VerifierReward, load_reward

SAMPLE = ("Sure, here it is.\n\nThe quick brown fox jumps over the lazy dog. It was happy! Was it? Yes.\n"
          "* one\n* two\nP.S. bye")
# the few kinds whose checker cannot build without an argument that has no random default
REQUIRED = {
    "combination:repeat_prompt": {"prompt_to_repeat": "Write about a fox."},
    "repeat:repeat_change": {"prompt_to_repeat": "Write about a fox."},
    "repeat:repeat_span": {"prompt_to_repeat": "Write about a fox.", "n_start": 0, "n_end": 5},
    "ratio:overlap": {"reference_text": "The quick brown fox jumps.", "percentage": 10},
}


def verdict(response, instruction_id, **kwargs):
    (v,) = verifiers.check(response, [instruction_id], [kwargs], "Write about a fox.")
    return v.strict, v.loose


def test_sentences_split_offline_by_nltk_english_punkt():
    import nltk
    import punkt

    root = verifiers.ensure_punkt()
    assert (root / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").stat().st_size > 100_000
    text = ("Dr. Smith arrived at 5 p.m. on Jan. 3. He met Mr. J. Bach of Acme Inc. They talked. "
            "The U.S. economy grew 3.5% in Q3, e.g. in retail. Was it enough? Nobody knew!")
    sentences = nltk.sent_tokenize(text)
    assert sentences[0] == "Dr. Smith arrived at 5 p.m. on Jan. 3."
    assert "They talked." in sentences and sentences[-2:] == ["Was it enough?", "Nobody knew!"]
    # the same parameters through the punkt package's own tokenizer agree on plain English
    assert punkt.sent_tokenize(text) == sentences
    assert nltk.word_tokenize("Don't stop. Go!") == ["Do", "n't", "stop", ".", "Go", "!"]
    assert nltk.data.load("nltk:tokenizers/punkt/english.pickle").tokenize("One. Two.") == ["One.", "Two."]


def test_downloads_refused_while_importing_checkers():
    import nltk

    original, refused = nltk.download, []
    with verifiers._no_downloads(refused):
        assert nltk.download("stopwords", quiet=True) is False
    assert refused == ["stopwords"] and nltk.download is original
    verifiers.registry()
    assert nltk.download is original


def test_every_offline_kind_checks_without_nltk_data():
    kinds = verifiers.offline_kinds()
    assert len(kinds) == len(verifiers.registry()) - len(verifiers.NEEDS_DOWNLOAD)
    assert {"punctuation:no_comma", "change_case:english_lowercase", "count:word_count_range"} <= set(kinds)
    for kind in kinds:
        checker = verifiers.registry()[kind](kind)
        checker.build_description(**REQUIRED.get(kind, {}))
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt="Write about a fox. Repeat this.")
        assert checker.check_following(SAMPLE) in (True, False), kind


@pytest.mark.parametrize("kind", sorted(verifiers.NEEDS_DOWNLOAD))
def test_kinds_needing_downloads_are_named(kind, monkeypatch):
    checker = verifiers.registry()[kind](kind)
    checker.build_description()
    with pytest.raises(LookupError):  # the reason they are refused: NLTK data no package ships
        checker.check_following(SAMPLE)
    with pytest.raises(verifiers.ConstraintError, match=f"'{kind}' cannot be checked offline"):
        verifiers.check(SAMPLE, [kind], [{}], "p")
    monkeypatch.delitem(verifiers.NEEDS_DOWNLOAD, kind)  # unlisted, the missing NLTK data is still named
    with pytest.raises(verifiers.ConstraintError, match=f"'{kind}' cannot be checked offline: Resource"):
        verifiers.check(SAMPLE, [kind], [{}], "p")
    with pytest.raises(verifiers.ConstraintError, match="unknown constraint 'no:such_kind'"):
        verifiers.check(SAMPLE, ["no:such_kind"], [{}], "p")


def test_loose_variants_match_the_reference_order():
    from if_verifiable.common import get_loose_transformations

    for text in (SAMPLE, "one line", "*a*\n**b**\nc*", ""):
        assert verifiers.loose_variants(text) == get_loose_transformations(text)


def test_strict_and_loose_by_hand():
    assert verdict("no commas here at all", "punctuation:no_comma") == (True, True)
    assert verdict("one, two", "punctuation:no_comma") == (False, False)
    assert verdict("all lower case text about a fox", "change_case:english_lowercase") == (True, True)
    # a capitalised first line is dropped by the loose variants only
    assert verdict("Sure!\nall lower case text about a fox that runs far away",
                   "change_case:english_lowercase") == (False, True)
    end = {"end_phrase": "Any other questions?"}
    assert verdict("The fox ran. Any other questions?", "startend:end_checker", **end) == (True, True)
    assert verdict("The fox ran. **Any other questions?**", "startend:end_checker", **end) == (False, True)
    assert verdict("The fox ran. Any other questions?\nThanks", "startend:end_checker", **end) == (False, True)
    assert verdict("<<A Fox>>\nThe fox ran.", "detectable_format:title") == (True, True)
    bullets = "* one\n* two\n* three"
    assert verdict(bullets, "detectable_format:number_bullet_lists", num_bullets=3) == (True, True)
    # loose drops the first or last line, so two of the three bullets also pass; five never do
    assert verdict(bullets, "detectable_format:number_bullet_lists", num_bullets=2) == (False, True)
    assert verdict(bullets, "detectable_format:number_bullet_lists", num_bullets=5) == (False, False)
    assert verdict("fox " * 30, "length_constraints:number_words", num_words=50, relation="less than") == (True, True)
    assert verdict("   ", "punctuation:no_comma") == (False, False)  # an empty response follows nothing


def test_check_arguments_validated():
    with pytest.raises(verifiers.ConstraintError, match="2 instruction ids but 1 kwargs"):
        verifiers.check("x", ["punctuation:no_comma", "detectable_format:title"], [{}], "p")
    record = {"key": 3, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": {}}
    with pytest.raises(verifiers.ConstraintError, match="here: field kwargs must be a list of 1 objects"):
        verifiers.validate_record(record, "here")
    record = {**record, "kwargs": [{"end_phrase": "x"}]}
    with pytest.raises(verifiers.ConstraintError, match="here: constraint 'punctuation:no_comma': arguments"):
        verifiers.validate_record(record, "here")
    with pytest.raises(verifiers.ConstraintError, match="constraint 'length_constraints:number_words': arguments"):
        verifiers.check("x", ["length_constraints:number_words"], [{"num_words": 5, "relation": "about"}], "p")


RECORDS = [
    {"key": 1, "prompt": "Describe a fox.", "instruction_id_list": ["punctuation:no_comma",
                                                                     "startend:end_checker"],
     "kwargs": [{}, {"end_phrase": "Done."}]},
    {"key": 2, "prompt": "Describe a dog.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{"unused": None}]},
]


def test_verifier_reward_fraction_strict_and_loose():
    strict, loose = VerifierReward(RECORDS), VerifierReward(RECORDS, variant="loose")
    prompts = ["Describe a fox.", "Describe a fox.", "Describe a fox.", "Describe a dog."]
    responses = ["A red fox. Done.", "A red, quick fox. Done.", "A red fox. **Done.**",
                 "a dog is a loyal friend who walks in the park every single day"]
    assert strict.score(prompts, responses) == [1.0, 0.5, 0.5, 1.0]
    assert loose.score(prompts, responses) == [1.0, 0.5, 1.0, 1.0]
    assert strict.score(prompts, responses) == strict.score(prompts, responses)
    with pytest.raises(KeyError, match="no constraints registered for prompt 'Describe a cat.'"):
        strict.score(["Describe a cat."], ["x"])


def test_verifier_reward_identity_tracks_variant_and_constraints():
    base = VerifierReward(RECORDS)
    assert base.identity == VerifierReward(list(reversed(RECORDS))).identity
    assert base.identity != VerifierReward(RECORDS, variant="loose").identity
    changed = [{**RECORDS[0], "kwargs": [{}, {"end_phrase": "Finished."}]}, RECORDS[1]]
    assert base.identity != VerifierReward(changed).identity
    grown = VerifierReward(RECORDS[:1])
    before = grown.identity
    assert grown.register(RECORDS[1:]).identity == base.identity != before
    with pytest.raises(ValueError, match="prompt record 2: its prompt text is registered already"):
        VerifierReward(RECORDS).register([{**RECORDS[1], "instruction_id_list": ["punctuation:no_comma"]}])
    with pytest.raises(verifiers.ConstraintError, match="prompt record 9: unknown constraint 'x:y'"):
        VerifierReward([{"key": 9, "prompt": "q", "instruction_id_list": ["x:y"], "kwargs": [{}]}])
    with pytest.raises(ValueError, match="variant 'medium'"):
        VerifierReward(RECORDS, variant="medium")


def test_load_reward_reads_constraint_files(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    reward = load_reward(RewardConfig(kind="verifier", variant="loose", constraints=(str(path),)))
    assert isinstance(reward, VerifierReward) and reward.variant == "loose"
    assert reward.identity == VerifierReward(RECORDS, variant="loose").identity
    assert load_reward(RewardConfig(kind="verifier"), records=RECORDS).identity == VerifierReward(RECORDS).identity
    path.write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(verifiers.ConstraintError, match=r"prompts.jsonl:2: not valid JSON"):
        load_reward(RewardConfig(kind="verifier", constraints=(str(path),)))
