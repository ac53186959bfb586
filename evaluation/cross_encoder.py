"""A cross-encoder judge: all-MiniLM-L6-v2 fine-tuned end to end on GPT-4-turbo preferences (``local:minilm-ce``).

Model (Bradley-Terry): the encoder reads "instruction [SEP] answer" (truncated to ``max_tokens``, the
answer first); its mean-pooled last hidden state goes through a linear head to a content score c(q, x).
Training scores s(q, x) = c(q, x) + a * log(1 + len(x)) and fits P(output beats reference) =
sigmoid(s(q, output) - s(q, reference)) to GPT-4-turbo's soft preference p - 1 (binary cross-entropy),
every encoder weight, the head and the length weight ``a`` together. The length term is fitted jointly
so that the content score need not learn verbosity, as LC's GLM separates length from quality; the
judge drops it when ``with_length`` is false (LC-style) and keeps it when true (GPT-4-turbo's raw
preference, length bias included; LC win rates are then computed from its preferences as from GPT-4's).

Each step takes ``instructions_per_step`` training instructions, each with its reference and
``outputs_per_instruction`` sampled model outputs; what a step draws (and its dropout) depends only on
(seed, step), so a run resumed from a checkpoint (every ``checkpoint_every`` steps, written atomically)
ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spi.stagefiles import write_folder, write_json

KIND = "cross-encoder"
HEAD_FILE, WEIGHTS_FILE, CHECKSUM_FILE = "judge_head.json", "cross_encoder.safetensors", "checksum.sha256"


@dataclass(frozen=True)
class CrossEncoderConfig:
    backbone: str = "minilm-l6"  # a spi.models name or a local HF folder of a BERT-like encoder
    max_tokens: int = 256  # instruction + answer, truncated longest first
    steps: int = 300  # optimisation steps
    instructions_per_step: int = 4  # instructions per step, each with its reference ...
    outputs_per_instruction: int = 3  # ... and this many model outputs (pairs per step = their product)
    lr: float = 3e-5  # encoder learning rate (AdamW, linear warm-up then linear decay)
    head_lr: float = 1e-3  # head and length weight
    weight_decay: float = 0.01
    warmup_steps: int = 20
    checkpoint_every: int = 25
    seed: int = 0
    with_length: bool = True  # judging adds the fitted length term (GPT-4-turbo's raw preference)


def _torch():
    import torch

    return torch


class CrossEncoder:
    """Encoder + linear head + length weight; ``scores`` gives content scores c(q, x)."""

    def __init__(self, encoder, tokenizer, max_tokens: int):
        torch = _torch()
        self.encoder, self.tokenizer, self.max_tokens = encoder, tokenizer, int(max_tokens)
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.length = torch.nn.Parameter(torch.zeros(()))

    def state_dict(self) -> dict:
        return {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                "head.weight": self.head.weight, "head.bias": self.head.bias, "length": self.length}

    def load_state_dict(self, state: dict) -> None:
        torch = _torch()
        self.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        with torch.no_grad():
            self.head.weight.copy_(state["head.weight"])
            self.head.bias.copy_(state["head.bias"])
            self.length.copy_(state["length"])

    def scores(self, instructions, answers):
        batch = self.tokenizer(list(instructions), list(answers), return_tensors="pt", padding=True,
                               truncation="longest_first", max_length=self.max_tokens)
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1)


def _loglen(texts) -> np.ndarray:
    return np.log1p([len(t) for t in texts])


# ----------------------------------------------------------------------------- training
def group_by_instruction(pairs) -> dict[int, list[tuple[str, str, float]]]:
    """{index: [(model, output, preference)]} from evaluation.trained_judge.collect_pairs rows."""
    groups = defaultdict(list)
    for model, index, output, pref in pairs:
        groups[index].append((model, output, float(pref)))
    return dict(sorted(groups.items()))


def draw_step(groups: dict, config: CrossEncoderConfig, step: int) -> list[tuple[int, list[tuple[str, str, float]]]]:
    """The instructions and outputs of ``step``: a function of (seed, step) only."""
    rng = np.random.default_rng([config.seed, step])
    keys = list(groups)
    chosen = rng.choice(len(keys), size=min(config.instructions_per_step, len(keys)), replace=False)
    out = []
    for k in chosen:
        rows = groups[keys[k]]
        picks = rng.choice(len(rows), size=min(config.outputs_per_instruction, len(rows)), replace=False)
        out.append((keys[k], [rows[p] for p in picks]))
    return out


def _step_loss(model: CrossEncoder, drawn, refs: dict):
    torch = _torch()
    questions, answers, ref_pos, out_pos, targets = [], [], [], [], []
    for index, rows in drawn:
        q, r = refs[index]
        ref_at = len(answers)
        questions.append(q)
        answers.append(r)
        for _, output, pref in rows:
            ref_pos.append(ref_at)
            out_pos.append(len(answers))
            targets.append(pref - 1.0)
            questions.append(q)
            answers.append(output)
    content = model.scores(questions, answers)
    score = content + model.length * torch.tensor(_loglen(answers), dtype=content.dtype)
    logits = score[out_pos] - score[ref_pos]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(targets, dtype=logits.dtype))


def _optimizer(model: CrossEncoder, config: CrossEncoderConfig):
    torch = _torch()
    opt = torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": [model.head.weight, model.head.bias, model.length], "lr": config.head_lr, "weight_decay": 0.0},
    ])

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _fresh_model(config: CrossEncoderConfig, groups: dict, refs: dict) -> CrossEncoder:
    """MiniLM, a zero head, and the length weight of a length-only Bradley-Terry fit on the training
    pairs (a start near the answer: at the head's learning rate it would take many steps to get there)."""
    from spi.models import load_encoder, load_tokenizer

    from .trained_judge import TrainedJudge

    torch = _torch()
    torch.manual_seed(config.seed)
    model = CrossEncoder(load_encoder(config.backbone), load_tokenizer(config.backbone), config.max_tokens)
    rows = [(index, output, pref) for index, group in groups.items() for _, output, pref in group]
    length_only = TrainedJudge.fit([refs[i][0] for i, _, _ in rows], [o for _, o, _ in rows],
                                   [refs[i][1] for i, _, _ in rows], [p for *_, p in rows], backbone=None, C=1.0)
    with torch.no_grad():
        model.length.fill_(float(length_only.coef[-1]))
    return model


def _data_digest(groups: dict, refs: dict) -> str:
    h = hashlib.sha256()
    for index, rows in groups.items():
        h.update(json.dumps([index, refs[index], rows]).encode())
    return h.hexdigest()[:16]


def _save_checkpoint(folder: Path, model: CrossEncoder, opt, sched, step: int, identity: dict) -> None:
    torch = _torch()

    def build(tmp: Path) -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp / "state.pt")
        write_json(tmp / "progress.json", {**identity, "step": step})

    write_folder(folder, build)


def _load_checkpoint(folder: Path, model: CrossEncoder, opt, sched, identity: dict) -> int:
    torch = _torch()
    progress = json.loads((folder / "progress.json").read_text())
    for key, value in identity.items():
        if progress.get(key) != value:
            raise ValueError(f"{folder}: checkpoint has {key}={progress.get(key)!r}, this run {value!r}; "
                             "delete the checkpoint folder or train into another --out")
    state = torch.load(folder / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(progress["step"])


def train_cross_encoder(eval_set, outputs_dir, preferences_dir, out_dir, *, config: CrossEncoderConfig = CrossEncoderConfig(),
                        models=None, indices=None, max_minutes: float | None = None, progress: bool = True) -> Path | None:
    """Train on every (model, instruction) preference of ``models`` x ``indices`` and save the judge to ``out_dir``.

    Resumes from ``<out_dir>.work/checkpoint`` when present (same config and data, else an error). With
    ``max_minutes`` it stops after that long at a checkpoint and returns None (run again to go on);
    otherwise it returns the saved judge's folder.
    """
    from tqdm.auto import tqdm

    from .trained_judge import collect_pairs

    torch = _torch()
    out_dir = Path(out_dir)
    groups = group_by_instruction(collect_pairs(eval_set, outputs_dir, preferences_dir, models=models, indices=indices))
    if not groups:
        raise ValueError(f"no judged pairs in {outputs_dir} / {preferences_dir}")
    refs = {e["index"]: (e["instruction"], e["reference_output"]) for e in eval_set}
    identity = {"config": dataclasses.asdict(config), "data": _data_digest(groups, refs)}
    model = _fresh_model(config, groups, refs)
    opt, sched = _optimizer(model, config)
    checkpoint = out_dir.with_name(out_dir.name + ".work") / "checkpoint"
    start = _load_checkpoint(checkpoint, model, opt, sched, identity) if (checkpoint / "progress.json").is_file() else 0
    model.encoder.train()
    began, losses = time.monotonic(), []
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train cross-encoder",
               unit="step", disable=not progress)
    for step in bar:
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout of this step
        loss = _step_loss(model, draw_step(groups, config, step), refs)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}", length=f"{float(model.length.detach()):.3f}")
        done = step + 1
        out_of_time = max_minutes is not None and time.monotonic() - began > 60 * max_minutes
        if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
            _save_checkpoint(checkpoint, model, opt, sched, done, identity)
        if out_of_time and done < config.steps:
            bar.close()
            return None
    meta = {"models": sorted({m for rows in groups.values() for m, *_ in rows}), "n_instructions": len(groups),
            "n_pairs": sum(len(rows) for rows in groups.values()), "data": identity["data"]}
    save_judge(out_dir, model, config, meta)
    return out_dir


def save_judge(out_dir, model: CrossEncoder, config: CrossEncoderConfig, meta: dict) -> Path:
    """The judge folder: fp16 weights (encoder + head + length), the encoder's config and tokenizer, the
    settings, and a checksum over the settings and the weights (the judge's identity)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_file({k: v.detach().to(_torch().float16).contiguous() for k, v in model.state_dict().items()},
                  str(tmp / WEIGHTS_FILE))
        model.encoder.config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        head = json.dumps({"kind": KIND, "config": dataclasses.asdict(config), "meta": meta}, sort_keys=True)
        (tmp / HEAD_FILE).write_text(head)
        (tmp / CHECKSUM_FILE).write_text(_checksum(tmp) + "\n")

    return write_folder(Path(out_dir), build)


def _checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for name in (HEAD_FILE, WEIGHTS_FILE):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def is_cross_encoder_folder(folder) -> bool:
    head = Path(folder) / HEAD_FILE
    return head.is_file() and json.loads(head.read_text()).get("kind") == KIND


# ----------------------------------------------------------------------------- judging
class CrossEncoderJudge:
    """A saved cross-encoder judge; scores each distinct (instruction, answer) once per call."""

    def __init__(self, model: CrossEncoder, config: CrossEncoderConfig, meta: dict, checksum: str,
                 batch_size: int = 16, progress: bool = False):
        self.model, self.config, self.meta = model, config, meta
        self.batch_size, self.progress = int(batch_size), progress
        self.identity = f"{KIND}:{config.backbone}:{'len' if config.with_length else 'nolen'}:{checksum[:16]}"

    @classmethod
    def load(cls, folder, with_length: bool | None = None, **kwargs) -> CrossEncoderJudge:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(folder)
        expected = (folder / CHECKSUM_FILE).read_text().strip()
        actual = _checksum(folder)
        if actual != expected:
            raise ValueError(f"{folder}: checksum mismatch ({actual[:12]} != {expected[:12]}); the judge was modified")
        head = json.loads((folder / HEAD_FILE).read_text())
        config = CrossEncoderConfig(**head["config"])
        if with_length is not None:
            config = dataclasses.replace(config, with_length=bool(with_length))
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        model = CrossEncoder(encoder, AutoTokenizer.from_pretrained(folder), config.max_tokens)
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
        model.encoder.eval()
        return cls(model, config, head["meta"], actual, **kwargs)

    def content_scores(self, instructions, answers) -> np.ndarray:
        from tqdm.auto import tqdm

        torch = _torch()
        distinct = list(dict.fromkeys(zip(instructions, answers, strict=True)))
        order = sorted(range(len(distinct)), key=lambda n: len(distinct[n][1]))  # less padding
        found = {}
        with torch.no_grad():
            for start in tqdm(range(0, len(order), self.batch_size), desc="cross-encoder", disable=not self.progress):
                rows = [distinct[n] for n in order[start:start + self.batch_size]]
                values = self.model.scores([q for q, _ in rows], [a for _, a in rows]).tolist()
                found.update(zip(rows, values, strict=True))
        return np.array([found[(q, a)] for q, a in zip(instructions, answers, strict=True)])

    def probability(self, instructions, outputs, references) -> np.ndarray:
        n = len(outputs)
        content = self.content_scores(list(instructions) * 2, list(outputs) + list(references))
        logit = content[:n] - content[n:]
        if self.config.with_length:
            logit = logit + float(self.model.length.detach()) * (_loglen(outputs) - _loglen(references))
        return np.exp(-np.logaddexp(0.0, -logit))

    def judge(self, instructions, outputs, references) -> list[float]:
        return (1.0 + self.probability(instructions, outputs, references)).tolist()
