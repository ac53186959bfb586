"""The store on SQLite and on a throwaway PostgreSQL (each test runs on both; PostgreSQL skips
when its server binaries are not installed)."""

import pytest
from sqlalchemy import create_engine, inspect, text

from mlflow_store.store import SCHEMA_VERSION, Store, StoreError, open_store, rollout_key, text_digest


def _rollouts(run_key="run-a", system="spi", iteration=1, prompts=("p1", "p2"), width=3):
    return [
        dict(
            run_key=run_key,
            system=system,
            iteration=iteration,
            prompt_key=p,
            row_index=i,
            text=f"{p}-{i}",
            n_tokens=10 + i,
        )
        for p in prompts
        for i in range(width)
    ]


def test_fresh_store_has_current_schema(store_url):
    with Store(store_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.upgrade() == SCHEMA_VERSION  # idempotent
        tables = set(inspect(store.engine).get_table_names())
        assert {
            "schema_version",
            "prompts",
            "rollouts",
            "rewards",
            "value_datasets",
            "generations",
            "judgements",
        } <= tables


def test_inserts_are_idempotent(store_url):
    with Store(store_url) as store:
        prompts = [{"prompt_key": "p1", "text": "Hi"}, {"prompt_key": "p2", "text": "Yo", "split": "eval"}]
        assert store.add_prompts(prompts) == 2
        assert store.add_prompts(prompts) == 0
        assert store.rows("prompts", prompt_key="p2")[0]["split"] == "eval"

        rows = _rollouts()
        assert store.add_rollouts(rows) == 6
        assert store.add_rollouts(rows + _rollouts(iteration=2)) == 6  # only the new iteration
        assert store.count("rollouts") == 12
        keys = [rollout_key("run-a", "spi", 1, "p1", i) for i in range(3)]
        assert {r["rollout_key"] for r in store.rows("rollouts", iteration=1, prompt_key="p1")} == set(keys)

        rewards = [
            {"reward_model": "rm@abc", "rollout_key": k, "reward": float(i)} for i, k in enumerate(keys)
        ]
        assert store.add_rewards(rewards[:2]) == 2
        assert store.unrewarded("rm@abc", keys) == keys[2:]
        assert store.add_rewards(rewards) == 1
        assert store.add_rewards([{**rewards[0], "reward": 5.0}]) == 0  # ignore keeps the first value
        assert store.rows("rewards", rollout_key=keys[0])[0]["reward"] == 0.0
        assert store.add_rewards([{**rewards[0], "reward": 5.0}], on_conflict="update") == 1
        assert store.rows("rewards", rollout_key=keys[0])[0]["reward"] == 5.0
        assert store.add_rewards([{**rewards[0], "reward_model": "rm@def"}]) == 1  # another identity

        ds = {
            "digest": "d" * 64,
            "path": "/data/v1.jsonl",
            "run_key": "run-a",
            "iteration": 1,
            "n_examples": 6,
        }
        assert store.add_value_datasets([ds]) == 1
        assert store.add_value_datasets([ds]) == 0

        gens = [
            dict(
                run_key="run-a",
                system="spi",
                iteration=1,
                instruction_key="i1",
                instruction="Say hi",
                output="hi",
                policy_tokens=3,
            )
        ]
        assert store.add_generations(gens) == 1
        assert store.add_generations(gens) == 0
        judged = dict(
            judge="j",
            instruction_digest=text_digest("Say hi"),
            output_1_digest="r",
            output_2_digest=text_digest("hi"),
            preference=1.5,
        )
        assert store.add_judgements([judged]) == 1
        assert store.add_judgements([judged]) == 0


def test_bulk_insert_of_many_rows(store_url):
    with Store(store_url) as store:
        rows = _rollouts(prompts=[f"p{i}" for i in range(700)], width=2)  # > one chunk
        assert store.add_rollouts(rows) == 1400
        assert store.add_rollouts(rows) == 0
        assert store.count("rollouts") == 1400


def test_bad_rows_fail_clearly(store_url):
    with Store(store_url) as store:
        with pytest.raises(ValueError, match="unknown columns for prompts: \\['txt'\\]"):
            store.add_prompts([{"prompt_key": "p", "txt": "typo"}])
        with pytest.raises(ValueError, match="misses \\['text'\\]"):
            store.add_prompts([{"prompt_key": "p"}])
        with pytest.raises(ValueError, match="unknown store table"):
            store.insert("nope", [{"a": 1}])
        with pytest.raises(ValueError, match="in \\[1, 2\\]"):
            store.add_judgements(
                [
                    dict(
                        judge="j",
                        instruction_digest="i",
                        output_1_digest="a",
                        output_2_digest="b",
                        preference=3,
                    )
                ]
            )


def _add_eval(store, run_key, system, iteration, outputs, prefs, judge="judge-a", reward=None):
    store.add_generations(
        [
            dict(
                run_key=run_key,
                system=system,
                iteration=iteration,
                instruction_key=f"i{n}",
                instruction=f"instruction {n}",
                output=out,
                policy_tokens=len(out),
                reward=reward,
            )
            for n, out in enumerate(outputs)
        ]
    )
    store.add_judgements(
        [
            dict(
                judge=judge,
                instruction_digest=text_digest(f"instruction {n}"),
                output_1_digest="ref",
                output_2_digest=text_digest(out),
                preference=p,
            )
            for n, (out, p) in enumerate(zip(outputs, prefs, strict=True))
            if p is not None
        ]
    )


def test_comparison_query(store_url):
    with Store(store_url) as store:
        _add_eval(store, "run-a", "base", 0, ["aa", "bb", "cc", "dd"], [1, 1, 2, 1], reward=0.1)
        _add_eval(store, "run-a", "spi", 1, ["a1", "b1", "c1", "d1"], [2, 2, 1.5, None], reward=0.4)
        _add_eval(store, "run-a", "spi", 2, ["a22", "b22", "c22", "d22"], [2, 2, 2, 2], reward=0.6)
        _add_eval(store, "run-b", "spi", 1, ["x", "y"], [1, 1])
        got = {(r["run_key"], r["system"], r["iteration"]): r for r in store.compare_runs(judge="judge-a")}
        assert list(got) == [
            ("run-a", "base", 0),
            ("run-a", "spi", 1),
            ("run-a", "spi", 2),
            ("run-b", "spi", 1),
        ]
        base, it1, it2, other = got.values()
        assert base["win_rate"] == pytest.approx(25.0) and base["mean_reward"] == pytest.approx(0.1)
        assert it1["win_rate"] == pytest.approx(100 * 2.5 / 3) and it1["n_judged"] == 3 and it1["n"] == 4
        assert it2["win_rate"] == pytest.approx(100.0) and it2["mean_policy_tokens"] == pytest.approx(3.0)
        assert it2["total_policy_tokens"] == 12
        assert other["mean_reward"] is None and other["win_rate"] == 0.0
        assert [r["run_key"] for r in store.compare_runs("judge-a", run_keys=["run-b"])] == ["run-b"]

        # a second judge is kept apart and must be named
        _add_eval(store, "run-a", "base", 0, ["aa", "bb", "cc", "dd"], [2, 2, 2, 2], judge="judge-b")
        with pytest.raises(ValueError, match="several judges"):
            store.compare_runs()
        assert store.compare_runs("judge-a")[0]["win_rate"] == pytest.approx(25.0)
        assert store.compare_runs("judge-b")[0]["win_rate"] == pytest.approx(100.0)


def test_rollout_summary(store_url):
    with Store(store_url) as store:
        store.add_rollouts(_rollouts(width=2))
        rewards = {("p1", 0): 1.0, ("p1", 1): 3.0, ("p2", 0): 0.0, ("p2", 1): -1.0}
        store.add_rewards(
            [
                {"reward_model": "rm", "rollout_key": rollout_key("run-a", "spi", 1, p, i), "reward": r}
                for (p, i), r in rewards.items()
            ]
        )
        (row,) = store.rollout_summary("rm")
        assert (row["n_leaves"], row["n_prompts"]) == (4, 2)
        assert row["mean_reward"] == pytest.approx(0.75)
        assert row["mean_best_reward"] == pytest.approx(1.5)
        assert row["mean_tokens"] == pytest.approx(10.5)
        assert store.rollout_summary("other-rm") == []


# The schema as version 1 shipped it, in portable SQL (no generations.reward / reward_model).
V1_DDL = [
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at VARCHAR(40) NOT NULL, note TEXT NOT NULL)",
    "CREATE TABLE prompts (prompt_key VARCHAR(256) PRIMARY KEY, text TEXT NOT NULL, split VARCHAR(32) NOT NULL)",
    """CREATE TABLE rollouts (run_key VARCHAR(256) NOT NULL, system VARCHAR(64) NOT NULL,
        iteration INTEGER NOT NULL, prompt_key VARCHAR(256) NOT NULL, row_index INTEGER NOT NULL,
        rollout_key VARCHAR(64) NOT NULL UNIQUE, text TEXT NOT NULL, n_tokens INTEGER NOT NULL,
        PRIMARY KEY (run_key, system, iteration, prompt_key, row_index))""",
    """CREATE TABLE rewards (reward_model VARCHAR(256) NOT NULL, rollout_key VARCHAR(64) NOT NULL,
        reward FLOAT NOT NULL, PRIMARY KEY (reward_model, rollout_key))""",
    """CREATE TABLE value_datasets (digest VARCHAR(64) PRIMARY KEY, path TEXT NOT NULL,
        run_key VARCHAR(256) NOT NULL, iteration INTEGER NOT NULL, n_examples INTEGER NOT NULL)""",
    """CREATE TABLE generations (run_key VARCHAR(256) NOT NULL, system VARCHAR(64) NOT NULL,
        iteration INTEGER NOT NULL, instruction_key VARCHAR(256) NOT NULL,
        instruction_digest VARCHAR(64) NOT NULL, output TEXT NOT NULL, output_digest VARCHAR(64) NOT NULL,
        policy_tokens INTEGER NOT NULL, value_tokens INTEGER NOT NULL, reward_tokens INTEGER NOT NULL,
        seconds FLOAT NOT NULL, PRIMARY KEY (run_key, system, iteration, instruction_key))""",
    """CREATE TABLE judgements (judge VARCHAR(256) NOT NULL, instruction_digest VARCHAR(64) NOT NULL,
        output_1_digest VARCHAR(64) NOT NULL, output_2_digest VARCHAR(64) NOT NULL,
        preference FLOAT NOT NULL,
        PRIMARY KEY (judge, instruction_digest, output_1_digest, output_2_digest))""",
    "INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00+00:00', 'created')",
    "INSERT INTO prompts VALUES ('p1', 'Hello', 'train')",
    "INSERT INTO rollouts VALUES ('run-old', 'spi', 1, 'p1', 0, 'rk0', 'leaf text', 7)",
    "INSERT INTO rewards VALUES ('rm', 'rk0', 0.25)",
    "INSERT INTO value_datasets VALUES ('dg', '/data/old.jsonl', 'run-old', 1, 1)",
    "INSERT INTO generations VALUES ('run-old', 'spi', 1, 'i1', 'id1', 'old output', 'od1', 12, 0, 0, 1.5)",
    "INSERT INTO judgements VALUES ('judge-a', 'id1', 'ref', 'od1', 2.0)",
]


def test_upgrade_from_v1_keeps_rows(store_url):
    engine = create_engine(store_url)
    with engine.begin() as conn:
        for statement in V1_DDL:
            conn.execute(text(statement))
    engine.dispose()

    with Store(store_url, upgrade=False) as old:
        assert old.schema_version() == 1
    with Store(store_url) as store:  # upgrades
        assert store.schema_version() == SCHEMA_VERSION
        assert store.rows("prompts") == [{"prompt_key": "p1", "text": "Hello", "split": "train"}]
        assert store.rows("rollouts")[0]["text"] == "leaf text"
        assert store.rows("rewards")[0]["reward"] == 0.25
        assert store.rows("value_datasets")[0]["path"] == "/data/old.jsonl"
        assert store.rows("judgements")[0]["preference"] == 2.0
        gen = store.rows("generations")[0]
        assert gen["output"] == "old output" and gen["seconds"] == 1.5 and gen["reward"] is None
        assert gen["w2s_tokens"] == 0  # v3's column, filled for rows written before it
        (row,) = store.compare_runs("judge-a")
        assert row["win_rate"] == 100.0 and row["total_policy_tokens"] == 12
        # new columns are usable after the upgrade
        store.add_generations(
            [
                dict(
                    run_key="run-new",
                    system="spi",
                    iteration=1,
                    instruction_key="i1",
                    instruction_digest="id1",
                    output="new",
                    reward=0.9,
                    reward_model="rm",
                    w2s_tokens=30,
                )
            ]
        )
        new = store.rows("generations", run_key="run-new")[0]
        assert new["reward"] == 0.9 and new["w2s_tokens"] == 30
        with store.engine.connect() as conn:
            versions = list(
                conn.execute(text("SELECT version FROM schema_version ORDER BY version")).scalars()
            )
        assert versions == list(range(1, SCHEMA_VERSION + 1))
    with Store(store_url) as again:  # opening again changes nothing
        assert again.count("generations") == 2


def test_newer_schema_is_refused(store_url):
    with Store(store_url) as store:
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO schema_version VALUES (99, 'later', 'future')"))
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        Store(store_url)


def test_foreign_tables_are_not_touched(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE prompts (x INTEGER)"))
    engine.dispose()
    with pytest.raises(StoreError, match="no schema_version table"):
        Store(url)


def test_default_url_and_bad_urls(tmp_path):
    with open_store(workdir=tmp_path / "w") as store:
        assert store.url == f"sqlite:///{(tmp_path / 'w' / 'store.db').resolve()}"
        assert (tmp_path / "w" / "store.db").exists()
    with pytest.raises(StoreError, match="malformed"):
        Store("not a url")
    with pytest.raises(StoreError, match="only sqlite and postgresql"):
        Store("mysql://u@127.0.0.1/db")
    with pytest.raises(
        StoreError, match=r"cannot open store 'postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/db'"
    ):
        Store("postgresql://u:secret@127.0.0.1:1/db")
