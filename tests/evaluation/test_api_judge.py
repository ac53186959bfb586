"""The alpaca_eval API judge (GPT-4-turbo annotators) run end to end against a local OpenAI-compatible
stand-in (tests/evaluation/openai_standin.py): the request alpaca_eval sends, retries after 500 and 429
answers, the parse of the log-probabilities into a preference (with alpaca_eval's random swap of the two
outputs), cost accounting, and both caches (the project's judgement cache and alpaca_eval's own). No key,
no network: the client config points at 127.0.0.1 with api_key 'dummy'."""

import importlib.util

import pytest
import yaml

from evaluation.judges import JudgeSpecError, check_judge_available, resolve_judge
from evaluation.judging import JudgementCache, judge_pairs
from tests.evaluation.openai_standin import GOOD, TOKENS, OpenAIStandIn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("alpaca_eval") is None, reason="alpaca-eval is not installed")

PRICE_PER_TOKEN = 0.01 / 1000  # alpaca_eval's price of gpt-4-1106-preview
INSTRUCTIONS = [f"Instruction {n}: say something useful." for n in range(6)]
# the model's answer is the better one (carries the marker) for even n, the reference for odd n
OUTPUTS = [f"model answer {n} {GOOD if n % 2 == 0 else ''}" for n in range(6)]
REFERENCES = [f"reference answer {n} {'' if n % 2 == 0 else GOOD}" for n in range(6)]


def _client_config(tmp_path, server, max_retries=1):
    path = tmp_path / "openai_configs.yaml"
    path.write_text(yaml.safe_dump({"default": [{"api_key": "dummy", "base_url": server.base_url,
                                                 "max_retries": max_retries}]}))
    return str(path)


def _judge(config, **kwargs):
    return resolve_judge("alpaca_eval", client_config_path=config, sleep_time=0, num_procs=1, **kwargs)


def test_the_judge_refuses_without_a_key_or_a_client_config(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    with pytest.raises(JudgeSpecError, match="OPENAI_API_KEY"):
        check_judge_available("alpaca_eval")
    with pytest.raises(JudgeSpecError, match="client_config_path"):
        check_judge_available("alpaca_eval", client_config_path=str(tmp_path / "absent.yaml"))


def test_requests_retries_parse_and_cost_against_a_stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    with OpenAIStandIn(failures=(500, 429)) as server:
        judge = _judge(_client_config(tmp_path, server))
        cache = JudgementCache(tmp_path / "judgements.sqlite")
        prefs = judge_pairs(judge, INSTRUCTIONS, OUTPUTS, REFERENCES, cache=cache)

        # parse: the side carrying the marker wins, whichever position alpaca_eval showed it in
        assert [p > 1.9 for p in prefs] == [n % 2 == 0 for n in range(6)]
        assert all(p < 1.1 for n, p in enumerate(prefs) if n % 2)
        # retries: 500 retried by the openai client, 429 by alpaca_eval's loop, then every pair answered once
        assert server.answered == 6 and len(server.requests) == 8
        # request format of the weighted GPT-4-turbo annotator
        first = server.requests[0]
        assert first["path"] == "/v1/chat/completions"
        headers = {k.lower(): v for k, v in first["headers"].items()}
        assert headers["authorization"] == "Bearer dummy"
        body = first["body"]
        assert body["model"] == "gpt-4-1106-preview" and body["max_tokens"] == 1
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        users = [r["body"]["messages"][1]["content"] for r in server.requests]
        assert all(any(f'"""{q}"""' in u for u in users) for q in INSTRUCTIONS)  # each instruction sent, quoted
        # cost: alpaca_eval's price per token times the tokens the server reported, per answered pair
        assert judge.n_requested == 6
        assert judge.cost_usd == pytest.approx(6 * TOKENS * PRICE_PER_TOKEN)
        # the project's judgement cache: asking again sends nothing
        again = judge_pairs(judge, INSTRUCTIONS, OUTPUTS, REFERENCES, cache=cache)
        assert again == pytest.approx(prefs) and len(server.requests) == 8 and len(cache) == 6


def test_alpaca_eval_cache_serves_a_new_judge_without_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    with OpenAIStandIn() as server:
        config = _client_config(tmp_path, server)
        first = _judge(config, caching_path=str(tmp_path / "annotations.json"))
        prefs = first.judge(INSTRUCTIONS[:3], OUTPUTS[:3], REFERENCES[:3])
        assert server.answered == 3 and (tmp_path / "annotations.json").is_file()
        second = _judge(config, caching_path=str(tmp_path / "annotations.json"))
        assert second.judge(INSTRUCTIONS[:3], OUTPUTS[:3], REFERENCES[:3]) == pytest.approx(prefs)
        assert server.answered == 3 and second.n_requested == 0 and second.cost_usd == 0.0
        second.judge(INSTRUCTIONS[3:4], OUTPUTS[3:4], REFERENCES[3:4])  # a new pair is requested and paid
        assert server.answered == 4 and second.n_requested == 1


def test_a_server_that_keeps_failing_gives_up_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    with OpenAIStandIn(failures=(500,) * 5) as server:
        judge = _judge(_client_config(tmp_path, server, max_retries=1))
        with pytest.raises(Exception, match="500|server"):
            judge.judge(INSTRUCTIONS[:1], OUTPUTS[:1], REFERENCES[:1])
        assert len(server.requests) == 2  # the first try and the client's one retry
