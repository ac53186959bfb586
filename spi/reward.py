"""Reward models behind one interface: ``score(instructions, responses) -> list[float]``.

``score_counted`` also returns how many tokens the model forwarded (real tokens, its own tokenizer's;
0 for the verifier, which runs no model); ``spi.compute.charge_reward`` scores while charging a
``Compute`` with the calls, the tokens and the seconds: the search's and the labels' scoring use it.

Backends:
- ``llm-judge``: any causal LM asked a rubric question; the score is log P(yes) - log P(no) of its
  next token (the offline default, with SmolLM2-135M-Instruct);
- ``hf-classifier``: any Hugging Face sequence-classification reward model (logit 0);
- ``preference-head``: a Bradley-Terry linear head on mean-pooled embeddings of a small encoder,
  trained on preference pairs by ``train_preference_head``;
- ``verifier``: the fraction of a prompt's verifiable constraints (IFEval/IFBench kinds, ``spi.verifiers``)
  that the response follows, strict or loose; the constraints are looked up by prompt text.
Each has an ``identity``: a digest of everything that changes its scores, for cache keys.
Each model runs on its own ``device`` in its own ``dtype``; inputs are cut at ``max_length`` tokens,
by default the model config's own limit (``spi.models.model_max_length``), never a fixed constant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spi.models import (
    load_causal_lm,
    load_encoder,
    load_sequence_classifier,
    load_tokenizer,
    model_device,
    model_max_length,
)
from spi.prompts import chat_prompt_ids

RUBRIC = (
    "Here is a user's instruction and an assistant's response.\n\n"
    "Instruction: {instruction}\n\nResponse: {response}\n\n"
    "Is the response helpful, correct, relevant to the instruction and clearly written? Answer yes or no."
)


def _identity(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RewardModel:
    identity: str
    name: str

    def score(self, instructions: list[str], responses: list[str]) -> list[float]:
        return self.score_counted(instructions, responses)[0]

    def score_counted(self, instructions: list[str], responses: list[str]) -> tuple[list[float], int]:
        """(one score per response, tokens the model forwarded)."""
        raise NotImplementedError


class LLMJudgeReward(RewardModel):
    def __init__(self, model_name: str, rubric: str = RUBRIC, batch_size: int = 8, dtype: str = "float32",
                 max_response_tokens: int = 384, device: str = "cpu"):
        self.name = f"llm-judge:{model_name}"
        self.model, self.tokenizer = load_causal_lm(model_name, dtype, device), load_tokenizer(model_name)
        self.rubric, self.batch_size, self.max_response_tokens = rubric, batch_size, max_response_tokens
        self.yes = self._first_token_ids(["yes", "Yes", " yes", " Yes"])
        self.no = self._first_token_ids(["no", "No", " no", " No"])
        self.identity = _identity("llm-judge", model_name, rubric, dtype, max_response_tokens)

    def _first_token_ids(self, words):
        return sorted({self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})

    def _prompt(self, instruction: str, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.max_response_tokens]
        clipped = self.tokenizer.decode(ids)
        return chat_prompt_ids(self.tokenizer, self.rubric.format(instruction=instruction, response=clipped))

    @torch.inference_mode()
    def score_counted(self, instructions, responses):
        scores, tokens = [], 0
        for s in range(0, len(responses), self.batch_size):
            prompts = [self._prompt(x, y) for x, y in zip(instructions[s:s + self.batch_size],
                                                          responses[s:s + self.batch_size], strict=True)]
            width = max(len(p) for p in prompts)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            limit = model_max_length(self.model)
            if limit and width > limit:
                raise ValueError(f"{self.name}: a judge prompt of {width} tokens exceeds the model's "
                                 f"{limit}; lower the rubric's max_response_tokens ({self.max_response_tokens})")
            ids, mask = ids.to(model_device(self.model)), mask.to(model_device(self.model))
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            yes = torch.logsumexp(logprobs[:, self.yes], -1)
            no = torch.logsumexp(logprobs[:, self.no], -1)
            scores += (yes - no).tolist()
            tokens += int(mask.sum())
        return scores, tokens


class ClassifierReward(RewardModel):
    def __init__(self, model_name: str, batch_size: int = 8, dtype: str = "float32", max_length: int | None = None,
                 device: str = "cpu"):
        self.name = f"hf-classifier:{model_name}"
        self.model = load_sequence_classifier(model_name, dtype, device)
        self.tokenizer = load_tokenizer(model_name)
        max_length = max_length or model_max_length(self.model)
        if max_length is None:
            raise ValueError(f"reward model '{model_name}' names no maximum length in its config; set reward.max_length")
        self.batch_size, self.max_length = batch_size, max_length
        self.identity = _identity("hf-classifier", model_name, dtype, max_length)

    def _encode(self, instructions, responses):
        if getattr(self.tokenizer, "chat_template", None):
            texts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": x}, {"role": "assistant", "content": y}], tokenize=False)
                for x, y in zip(instructions, responses, strict=True)]
            return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(instructions, responses, padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    @torch.inference_mode()
    def score_counted(self, instructions, responses):
        scores, tokens = [], 0
        for s in range(0, len(responses), self.batch_size):
            batch = self._encode(instructions[s:s + self.batch_size], responses[s:s + self.batch_size])
            batch = {k: v.to(model_device(self.model)) for k, v in batch.items()}
            scores += self.model(**batch).logits[:, 0].float().tolist()
            tokens += int(batch["attention_mask"].sum())
        return scores, tokens


class PreferenceHeadReward(RewardModel):
    """r = w . [mean-pooled embedding of instruction + response] + b, trained Bradley-Terry."""

    def __init__(self, folder: str | Path, batch_size: int = 16, device: str = "cpu"):
        folder = Path(folder)
        meta = json.loads((folder / "head.json").read_text())
        self.backbone_name = meta["backbone"]
        self.name = f"preference-head:{folder.name}"
        self.encoder = load_encoder(self.backbone_name, device=device)
        self.tokenizer = load_tokenizer(self.backbone_name)
        weights = load_file(folder / "head.safetensors")
        self.weight, self.bias = weights["weight"], weights["bias"]
        self.batch_size = batch_size
        self.identity = _identity("preference-head", self.backbone_name,
                                  hashlib.sha256((folder / "head.safetensors").read_bytes()).hexdigest())

    def score_counted(self, instructions, responses):
        features, tokens = embed_pairs_counted(self.encoder, self.tokenizer, instructions, responses, self.batch_size)
        return (features @ self.weight + self.bias).tolist(), tokens


class VerifierReward(RewardModel):
    """Fraction of the prompt's constraints followed, by IFEval's strict (default) or loose verdicts.

    ``score`` receives prompt texts, so the constraints travel beside them: prompt records in IFEval's
    schema (key, prompt, instruction_id_list, kwargs) are registered, at construction or later with
    ``register``, and looked up by their prompt text. The identity covers the variant, the checkers'
    versions and every registered constraint: register the prompt set before reading it.
    """

    def __init__(self, records=(), variant: str = "strict"):
        if variant not in ("strict", "loose"):
            raise ValueError(f"reward.variant '{variant}' is not one of strict, loose")
        self.variant, self.name = variant, f"verifier:{variant}"
        self.constraints: dict[str, tuple[list[str], list[dict]]] = {}
        self.register(records)

    def register(self, records) -> VerifierReward:
        from spi.verifiers import checker_version, validate_record

        for record in records:
            where = f"prompt record {record.get('key')!r}" if isinstance(record, dict) else "prompt record"
            record = validate_record(record, where)
            entry = (list(record["instruction_id_list"]), [dict(k) for k in record["kwargs"]])
            known = self.constraints.setdefault(record["prompt"], entry)
            if known != entry:
                raise ValueError(f"prompt record {record['key']!r}: its prompt text is registered already with "
                                 f"other constraints ({known[0]} vs {entry[0]})")
        self.identity = _identity("verifier", self.variant, checker_version(),
                                  sorted((p, ids, kw) for p, (ids, kw) in self.constraints.items()))
        return self

    def score_counted(self, instructions, responses):
        from spi.verifiers import check

        scores = []
        for instruction, response in zip(instructions, responses, strict=True):
            if instruction not in self.constraints:
                raise KeyError(f"verifier reward: no constraints registered for prompt {instruction[:80]!r} "
                               f"({len(self.constraints)} prompts registered)")
            ids, kwargs = self.constraints[instruction]
            verdicts = check(response, ids, kwargs, instruction)
            followed = [v.strict if self.variant == "strict" else v.loose for v in verdicts]
            scores.append(sum(followed) / len(followed) if followed else 1.0)
        return scores, 0  # rules, no model


def embed_pairs(encoder, tokenizer, instructions, responses, batch_size=16, max_length=256) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of 'instruction [SEP] response'."""
    return embed_pairs_counted(encoder, tokenizer, instructions, responses, batch_size, max_length)[0]


@torch.inference_mode()
def embed_pairs_counted(encoder, tokenizer, instructions, responses, batch_size=16,
                        max_length=256) -> tuple[torch.Tensor, int]:
    """``embed_pairs`` and the tokens the encoder forwarded."""
    out, tokens = [], 0
    for s in range(0, len(responses), batch_size):
        batch = tokenizer(instructions[s:s + batch_size], responses[s:s + batch_size], padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v.to(model_device(encoder)) for k, v in batch.items()}
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        tokens += int(batch["attention_mask"].sum())
    return (torch.cat(out) if out else torch.zeros(0)), tokens


def train_preference_head(instructions, chosen, rejected, backbone: str, out_dir: str | Path,
                          epochs: int = 200, learning_rate: float = 0.05, weight_decay: float = 1e-3,
                          seed: int = 0) -> Path:
    """Fit a Bradley-Terry head: P(chosen > rejected) = sigmoid(r(chosen) - r(rejected))."""
    encoder, tokenizer = load_encoder(backbone), load_tokenizer(backbone)
    good = embed_pairs(encoder, tokenizer, instructions, chosen)
    bad = embed_pairs(encoder, tokenizer, instructions, rejected)
    torch.manual_seed(seed)
    weight = torch.zeros(good.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=learning_rate, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = -torch.nn.functional.logsigmoid((good - bad) @ weight).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.detach().contiguous(), "bias": torch.zeros(())}, out / "head.safetensors")
    (out / "head.json").write_text(json.dumps({"backbone": backbone, "pairs": len(chosen),
                                               "final_loss": float(loss)}, indent=2))
    return out


def load_reward(config, device: str | None = None, records=()) -> RewardModel:
    """Build the reward model a ``spi.config.RewardConfig`` names, on ``reward.device`` (else ``device``);
    ``records``: verifier prompt records registered beside the files of ``reward.constraints``."""
    if config.kind == "verifier":
        from spi.verifiers import read_prompt_records

        files = [r for path in config.constraints for r in read_prompt_records(path)]
        return VerifierReward([*files, *records], variant=config.variant)
    device = getattr(config, "device", None) or device or "cpu"
    dtype = getattr(config, "dtype", "float32")
    if config.kind == "llm-judge":
        return LLMJudgeReward(config.model, batch_size=config.batch_size, dtype=dtype, device=device)
    if config.kind == "hf-classifier":
        return ClassifierReward(config.model, batch_size=config.batch_size, dtype=dtype,
                                max_length=getattr(config, "max_length", None), device=device)
    if config.kind == "preference-head":
        if not config.head:
            raise ValueError("reward.head must name a trained head folder when reward.kind is 'preference-head'")
        return PreferenceHeadReward(config.head, batch_size=config.batch_size, device=device)
    raise ValueError(f"reward.kind '{config.kind}' is not one of llm-judge, hf-classifier, preference-head, verifier")
