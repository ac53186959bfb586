"""A local judge trained on GPT-4-turbo preferences, and an honest measure of its agreement.

Model (Bradley-Terry): each answer x to instruction q gets a score s(q, x) = w . f(q, x) + a * log(1 + len(x)),
where f is the mean-pooled, L2-normalised embedding of "q\\n\\nx" by a frozen backbone (default
``minilm-l6``; none for a judge without embeddings), and/or the statistics of x's text
(:mod:`evaluation.text_features`, ``text_features=True``). P(output beats reference) =
sigmoid(s(output) - s(reference)): a logistic regression without intercept on feature differences,
fitted on soft labels p - 1 with an L2 penalty. No intercept keeps the judge antisymmetric (swap the
answers, get 1 - P), so it works against any reference. ``instruction_offsets`` adds, on top of that
score, an offset per (instruction, reference) seen in training: how hard that reference is to beat.

Agreement (:func:`judge_agreement`) holds out models AND instructions at once: train on
(train models x train instructions), test on (test models x test instructions), and compares with a
length-only Bradley-Terry model fitted on the same split (JUDGES.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .leaderboard import load_folder

HEAD_FILE, CHECKSUM_FILE = "judge_head.json", "checksum.sha256"


def default_embed_cache() -> Path:
    """Embedding cache shared by the CLI and the tests: $SPI_CACHE_DIR/embeddings (default ~/.cache/spi)."""
    return Path(os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi") / "embeddings"


# ----------------------------------------------------------------------------- embeddings
class Embedder:
    """Frozen backbone: mean-pooled, L2-normalised last hidden states; an optional on-disk cache."""

    def __init__(self, backbone: str = "minilm-l6", max_tokens: int = 128, batch_size: int = 32, cache_dir=None):
        self.backbone, self.max_tokens, self.batch_size = backbone, int(max_tokens), int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from spi.models import load_encoder, load_tokenizer

            self._model, self._tokenizer = load_encoder(self.backbone), load_tokenizer(self.backbone)
            self._tokenizer.padding_side = "right"

    def _key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([self.backbone, self.max_tokens, text]).encode()).hexdigest()

    def _db(self):
        import sqlite3

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.cache_dir / "embeddings.sqlite", timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
        return db

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (rows in order); cached per text when ``cache_dir`` is set."""
        keys = [self._key(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        if self.cache_dir:
            with self._db() as db:
                for start in range(0, len(keys), 500):
                    chunk = list(dict.fromkeys(keys[start:start + 500]))
                    marks = ",".join("?" * len(chunk))
                    for k, v in db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                        found[k] = np.frombuffer(v, dtype=np.float32)
        todo = list(dict.fromkeys(n for n, k in enumerate(keys) if k not in found))
        todo = list({keys[n]: n for n in reversed(todo)}.values())  # one row per distinct text
        if todo:
            new = self._embed([texts[n] for n in todo])
            fresh = {keys[n]: v for n, v in zip(todo, new, strict=False)}
            if self.cache_dir:
                with self._db() as db:
                    db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                                   [(k, v.astype(np.float32).tobytes()) for k, v in fresh.items()])
            found.update(fresh)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[k] for k in keys])

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        self._load()
        order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self._tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                                        truncation=True, max_length=self.max_tokens)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        emb = np.concatenate(chunks)
        out = np.zeros_like(emb)
        out[order] = emb
        return out


def _answer_features(embedder: Embedder | None, instructions, answers, text_features: bool = False) -> np.ndarray:
    """Per-answer features: [embedding], [text statistics], log(1 + characters) last (the length column)."""
    from .text_features import text_statistics_matrix

    parts = []
    if embedder is not None:
        parts.append(embedder.encode([f"{q}\n\n{a}" for q, a in zip(instructions, answers, strict=False)]))
    if text_features:
        parts.append(text_statistics_matrix(answers))
    parts.append(np.log1p([len(a) for a in answers])[:, None])
    return np.hstack(parts)


def _feature_differences(embedder, instructions, outputs, references, text_features: bool) -> np.ndarray:
    return (_answer_features(embedder, instructions, outputs, text_features)
            - _answer_features(embedder, instructions, references, text_features))


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _soft_log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Summed log-loss of soft labels ``y`` under P = sigmoid(z)."""
    p = np.clip(_sigmoid(z), 1e-9, 1 - 1e-9)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())


LENGTH_BOOST = 30.0
C_GRID = (0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def pair_key(instruction: str, reference: str) -> str:
    """The key of an instruction's offset: the instruction with the exact reference it was learned against."""
    return hashlib.sha256(json.dumps([instruction, reference]).encode()).hexdigest()[:16]


def _fit_bt(diff: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    """Soft-label logistic regression without intercept on feature differences; returns the coefficients."""
    from sklearn.linear_model import LogisticRegression

    scale = np.sqrt((diff ** 2).mean(axis=0)) + 1e-8  # no centring: keeps antisymmetry
    scale[-1] /= LENGTH_BOOST  # the length feature (last column) is nearly unpenalised
    Xs = diff / scale
    X = np.concatenate([Xs, Xs])
    t = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    w = np.concatenate([y, 1 - y])
    keep = w > 0
    model = LogisticRegression(C=C, l1_ratio=0.0, fit_intercept=False, max_iter=2000)
    model.fit(X[keep], t[keep], sample_weight=w[keep])
    return model.coef_[0] / scale


def _fit_offsets(z: np.ndarray, y: np.ndarray, keys: Sequence[str], strength: float,
                 iterations: int = 50) -> dict[str, float]:
    """One offset per key on top of the fixed scores ``z``: soft log-loss of sigmoid(z + d_key) plus
    d_key ** 2 / (2 * strength), solved by Newton's method for all keys at once."""
    names, row_key = np.unique(np.asarray(keys), return_inverse=True)
    d = np.zeros(len(names))
    for _ in range(iterations):
        p = _sigmoid(z + d[row_key])
        gradient = np.bincount(row_key, p - y, len(names)) + d / strength
        curvature = np.bincount(row_key, p * (1 - p), len(names)) + 1 / strength
        d -= gradient / curvature
    return {str(k): round(float(v), 6) for k, v in zip(names, d, strict=True)}


def _choose_C(diff: np.ndarray, y: np.ndarray, models: Sequence, instructions: Sequence, grid=C_GRID,
              n_splits: int = 3) -> float:
    """Pick C by soft log-loss on folds that hold out models AND instructions at once.

    Fold k trains on rows whose model and instruction are both outside fold k and tests on rows
    whose model and instruction are both inside it (holding out only models leaks instructions).
    """
    m_names, i_names = sorted(set(models)), sorted(set(instructions))
    if len(m_names) < 2 or len(i_names) < 2:
        return 1.0
    rng = np.random.default_rng(0)
    m_fold = dict(zip(m_names, rng.permutation(len(m_names)) % n_splits, strict=False))
    i_fold = dict(zip(i_names, rng.permutation(len(i_names)) % n_splits, strict=False))
    fm, fi = np.array([m_fold[m] for m in models]), np.array([i_fold[i] for i in instructions])
    losses = []
    for C in grid:
        loss = 0.0
        for k in range(n_splits):
            train, test = (fm != k) & (fi != k), (fm == k) & (fi == k)
            if not train.any() or not test.any():
                continue
            loss += _soft_log_loss(y[test], diff[test] @ _fit_bt(diff[train], y[train], C))
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])


OFFSET_STRENGTHS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # prior variance of an offset (logit units squared)


def _choose_offset_strength(z: np.ndarray, y: np.ndarray, models: Sequence, keys: Sequence[str],
                            grid=OFFSET_STRENGTHS, n_splits: int = 3) -> float:
    """Pick the offsets' prior by soft log-loss on folds that hold out models only: offsets serve unseen
    models on instructions (and references) seen in training, which is what these folds test."""
    names = sorted(set(models))
    if len(names) < 2:
        return 1.0
    fold = dict(zip(names, np.random.default_rng(0).permutation(len(names)) % n_splits, strict=False))
    fm, keys = np.array([fold[m] for m in models]), np.asarray(keys)
    losses = []
    for strength in grid:
        loss = 0.0
        for k in range(n_splits):
            train, test = fm != k, fm == k
            offsets = _fit_offsets(z[train], y[train], keys[train], strength)
            loss += _soft_log_loss(y[test], z[test] + np.array([offsets.get(key, 0.0) for key in keys[test]]))
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])


# ----------------------------------------------------------------------------- pairs from the data
def collect_pairs(eval_set, outputs_dir, preferences_dir, *, models=None, indices=None) -> list[tuple[str, int, str, float]]:
    """(model, index, output, preference) for every judged pair, skipping outputs identical to the reference."""
    refs = {e["index"]: e["reference_output"] for e in eval_set}
    wanted = set(indices) if indices is not None else None
    outputs = load_folder(outputs_dir, "output", eval_set, allow_empty=True, keep=wanted)
    prefs = load_folder(preferences_dir, "preference", eval_set, keep=wanted)
    pairs = []
    for model in sorted(set(outputs) & set(prefs)):
        if models is not None and model not in models:
            continue
        for i, p in sorted(prefs[model].items()):
            if (wanted is None or i in wanted) and i in outputs[model] and outputs[model][i] != refs[i]:
                pairs.append((model, i, outputs[model][i], p))
    return pairs


class TrainedJudge:
    """Bradley-Terry head on a frozen backbone and/or text statistics (neither: the length-only baseline),
    with optional per-instruction offsets learned against the training references (``offsets``: {pair_key:
    value}; an instruction or reference not seen in training gets none)."""

    def __init__(self, coef: np.ndarray, backbone: str | None, max_tokens: int = 128, meta: dict | None = None,
                 checksum: str | None = None, embed_cache_dir=None, text_features: bool = False,
                 offsets: dict[str, float] | None = None):
        self.coef, self.backbone, self.max_tokens = np.asarray(coef, dtype=float), backbone, int(max_tokens)
        self.meta, self.text_features, self.offsets = meta or {}, bool(text_features), dict(offsets or {})
        self.embedder = Embedder(backbone, max_tokens, cache_dir=embed_cache_dir) if backbone else None
        digest = checksum or hashlib.sha256(self._payload().encode()).hexdigest()
        label = "+".join([*([backbone] if backbone else []), *(["text"] if text_features else [])]) or "length-only"
        self.identity = f"trained:{label}:{digest[:16]}"

    def _payload(self) -> str:
        data = {"coef": self.coef.tolist(), "backbone": self.backbone, "max_tokens": self.max_tokens, "meta": self.meta}
        if self.text_features:  # absent = False, so judges saved before text features keep their bytes
            data["text_features"] = True
        if self.offsets:
            data["instruction_offsets"] = self.offsets
        return json.dumps(data, sort_keys=True)

    @classmethod
    def fit(cls, instructions, outputs, references, preferences, *, backbone: str | None = "minilm-l6",
            max_tokens: int = 128, C: float | str = "auto", groups=None, embed_cache_dir=None, meta=None,
            text_features: bool = False, instruction_offsets: bool = False) -> TrainedJudge:
        """Fit on pairs; ``C="auto"`` picks the L2 strength by CV holding out groups (models) and instructions.
        ``instruction_offsets`` then adds an offset per (instruction, reference) on top of the fitted scores
        (which it leaves unchanged), its prior picked by CV holding out groups."""
        embedder = Embedder(backbone, max_tokens, cache_dir=embed_cache_dir) if backbone else None
        diff = _feature_differences(embedder, instructions, outputs, references, text_features)
        y = np.asarray(preferences, dtype=float) - 1.0
        groups = groups if groups is not None else ["all"] * len(y)
        if C == "auto":
            C = _choose_C(diff, y, groups, list(instructions))
        coef = _fit_bt(diff, y, float(C))
        offsets, extra = {}, {}
        if instruction_offsets:
            keys, scores = [pair_key(q, r) for q, r in zip(instructions, references, strict=True)], diff @ coef
            extra["offset_strength"] = _choose_offset_strength(scores, y, groups, keys)
            offsets = _fit_offsets(scores, y, keys, extra["offset_strength"])
        judge = cls(coef, backbone, max_tokens, meta={**(meta or {}), "C": C, "n_pairs": len(preferences), **extra},
                    embed_cache_dir=embed_cache_dir, text_features=text_features, offsets=offsets)
        judge.embedder = embedder or judge.embedder
        return judge

    def probability(self, instructions, outputs, references) -> np.ndarray:
        diff = _feature_differences(self.embedder, instructions, outputs, references, self.text_features)
        z = diff @ self.coef
        if self.offsets:
            z = z + np.array([self.offsets.get(pair_key(q, r), 0.0) for q, r in zip(instructions, references, strict=True)])
        return _sigmoid(z)

    def judge(self, instructions, outputs, references) -> list[float]:
        return (1.0 + self.probability(instructions, outputs, references)).tolist()

    def save(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = self._payload()
        (folder / HEAD_FILE).write_text(payload)
        (folder / CHECKSUM_FILE).write_text(hashlib.sha256(payload.encode()).hexdigest() + "\n")
        return folder

    @classmethod
    def load(cls, folder, embed_cache_dir=None, with_length: bool | None = None) -> TrainedJudge:
        """A saved judge; ``with_length=False`` drops its length term (the LC-style counterfactual: the answer
        judged as if it were as long as the reference), which changes its identity."""
        folder = Path(folder)
        payload = (folder / HEAD_FILE).read_text()
        expected = (folder / CHECKSUM_FILE).read_text().strip()
        actual = hashlib.sha256(payload.encode()).hexdigest()
        if actual != expected:
            raise ValueError(f"{folder}: checksum mismatch ({actual[:12]} != {expected[:12]}); the judge was modified")
        data = json.loads(payload)
        judge = cls(data["coef"], data["backbone"], data["max_tokens"], data["meta"], checksum=actual,
                    embed_cache_dir=embed_cache_dir, text_features=data.get("text_features", False),
                    offsets=data.get("instruction_offsets"))
        if with_length is not None and not with_length:
            judge.coef[-1] = 0.0  # the length column is last (_answer_features)
            judge.identity += ":nolen"
        return judge


def train_judge(eval_set, outputs_dir, preferences_dir, out_dir, *, backbone: str | None = "minilm-l6",
                models=None, indices=None, max_tokens: int = 128, C: float | str = "auto", embed_cache_dir=None,
                text_features: bool = False, instruction_offsets: bool = False) -> TrainedJudge:
    """Train a judge on every (model, instruction) preference in the folders and save it to ``out_dir``."""
    refs = {e["index"]: e for e in eval_set}
    pairs = collect_pairs(eval_set, outputs_dir, preferences_dir, models=models, indices=indices)
    if not pairs:
        raise ValueError(f"no judged pairs in {outputs_dir} / {preferences_dir}")
    judge = TrainedJudge.fit(
        [refs[i]["instruction"] for _, i, _, _ in pairs], [o for _, _, o, _ in pairs],
        [refs[i]["reference_output"] for _, i, _, _ in pairs], [p for *_, p in pairs],
        backbone=backbone, max_tokens=max_tokens, C=C, groups=[m for m, *_ in pairs], embed_cache_dir=embed_cache_dir,
        text_features=text_features, instruction_offsets=instruction_offsets, meta={"models": sorted({m for m, *_ in pairs}), "n_instructions": len({i for _, i, _, _ in pairs})},
    )
    judge.save(out_dir)
    return judge


# ----------------------------------------------------------------------------- agreement
def agreement_metrics(models: Sequence[str], predicted: np.ndarray, preferences: np.ndarray) -> dict[str, float]:
    """Agreement of predicted P(model better) with GPT-4 preferences p in [1, 2] (JUDGES.md)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    predicted, y = np.asarray(predicted, dtype=float), np.asarray(preferences, dtype=float) - 1.0
    decisive = np.abs(y - 0.5) > 0.25
    labels = y[decisive] > 0.5
    auc = roc_auc_score(labels, predicted[decisive]) if 0 < labels.sum() < len(labels) else float("nan")
    models = np.asarray(models)
    names = sorted(set(models))
    ours = np.array([predicted[models == m].mean() * 100 for m in names])
    gpt4 = np.array([y[models == m].mean() * 100 for m in names])
    return {
        "auc_decisive": float(auc),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted[decisive] > 0.5)),
        "spearman": float(spearmanr(predicted, y).statistic),
        "winrate_error": float(np.abs(ours - gpt4).mean()),
        "model_rank_spearman": float(spearmanr(ours, gpt4).statistic) if len(names) > 2 else float("nan"),
        "n_pairs": int(len(y)),
        "n_decisive": int(decisive.sum()),
        "n_models": len(names),
    }


def split_models_and_instructions(models: Sequence[str], indices: Sequence[int], *, test_fraction: float = 0.3,
                                  seed: int = 0) -> tuple[list[str], list[str], list[int], list[int]]:
    """Deterministic disjoint split of models and of instructions (train models, test models, train idx, test idx)."""
    rng = np.random.default_rng(seed)
    models, indices = sorted(models), sorted(indices)
    m_perm, i_perm = rng.permutation(len(models)), rng.permutation(len(indices))
    n_mt, n_it = max(1, round(test_fraction * len(models))), max(1, round(test_fraction * len(indices)))
    test_m = sorted(models[k] for k in m_perm[:n_mt])
    test_i = sorted(indices[k] for k in i_perm[:n_it])
    return ([m for m in models if m not in test_m], test_m, [i for i in indices if i not in set(test_i)], test_i)


def judge_agreement(eval_set, outputs_dir, preferences_dir, *, backbone: str | None = "minilm-l6", indices=None,
                    models=None, test_fraction: float = 0.3, seed: int = 0, C: float | str = "auto", max_tokens: int = 128,
                    embed_cache_dir=None, text_features: bool = False) -> dict[str, dict]:
    """Train on (train models x train instructions), test on (test models x test instructions).

    Returns {"judge": metrics, "length_only": metrics, "split": {...}} for the backbone judge and the
    length-only baseline fitted on the same training pairs.
    """
    pairs = collect_pairs(eval_set, outputs_dir, preferences_dir, models=models, indices=indices)
    all_models = sorted({m for m, *_ in pairs})
    all_idx = sorted({i for _, i, _, _ in pairs})
    train_m, test_m, train_i, test_i = split_models_and_instructions(all_models, all_idx, test_fraction=test_fraction, seed=seed)
    tm, ti = set(train_m), set(train_i)
    train = [p for p in pairs if p[0] in tm and p[1] in ti]
    test = [p for p in pairs if p[0] not in tm and p[1] not in ti]
    refs = {e["index"]: e for e in eval_set}

    def columns(rows):
        return ([refs[i]["instruction"] for _, i, _, _ in rows], [o for _, _, o, _ in rows],
                [refs[i]["reference_output"] for _, i, _, _ in rows], np.array([p for *_, p in rows]))

    result = {"split": {"train_models": train_m, "test_models": test_m, "n_train_instructions": len(train_i),
                        "n_test_instructions": len(test_i), "n_train_pairs": len(train), "n_test_pairs": len(test)}}
    q_te, o_te, r_te, p_te = columns(test)
    for name, bb, text in (("judge", backbone, text_features), ("length_only", None, False)):
        judge = TrainedJudge.fit(*columns(train), backbone=bb, C=C, max_tokens=max_tokens, text_features=text,
                                 groups=[m for m, *_ in train], embed_cache_dir=embed_cache_dir)
        result["split"][f"{name}_C"] = judge.meta["C"]
        result[name] = agreement_metrics([m for m, *_ in test], judge.probability(q_te, o_te, r_te), p_te)
    return result


def format_agreement(result: dict) -> str:
    keys = ("auc_decisive", "balanced_accuracy", "spearman", "winrate_error", "model_rank_spearman")
    lines = [f"{'judge':<14}" + "".join(f"{k:>20}" for k in keys)]
    for name in ("judge", "length_only"):
        lines.append(f"{name:<14}" + "".join(f"{result[name][k]:>20.3f}" for k in keys))
    s = result["split"]
    lines.append(f"held out: {len(s['test_models'])} models x {s['n_test_instructions']} instructions "
                 f"({s['n_test_pairs']} pairs); trained on {s['n_train_pairs']} pairs")
    return "\n".join(lines)

