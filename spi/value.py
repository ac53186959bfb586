"""Value models: a scalar head read at every position, fitted by Monte Carlo regression.

Two kinds behind one class:
- ``policy-head``: a linear head on the frozen policy's last hidden state. During search the policy's
  forward pass already computes that state, so guidance costs one dot product per row.
- ``backbone``: a separate transformer with the head at every position, fully fine-tuned or
  LoRA-tuned. With the policy's tokenizer it keeps its own KV cache fed the sampled tokens during
  search; with another tokenizer (a reward model of another family, as IRO's) it reads re-encoded text,
  in fitting and in search alike (``spi.prompts.reencoded_ids``).
Inputs are built by ``spi.prompts.value_input_ids`` for fitting and for search alike.

Saved as a folder: ``value.json`` (kind, names, sizes, fit report, sha256 of every weight file) plus
``head.safetensors`` and, for the backbone kind, ``backbone/``. Loading verifies the checksums.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spi.value_batches import batch_tensors, input_tokens, pad_right
from spi.value_ridge import fit_ridge_head

FORMAT_VERSION = 1


@dataclass
class FitReport:
    train_sequences: int
    train_positions: int
    final_loss: float
    holdout_sequences: int
    holdout_mse: float
    holdout_explained_variance: float
    seconds: float
    # within a held-out prompt: how often V orders two leaves' prefixes as their rewards do (ties 1/2);
    # what selection needs, while explained variance also counts between-prompt differences
    holdout_pair_accuracy: float = float("nan")
    ridge_penalty: float | None = None  # the cross-validated penalty of the ridge solver
    # what the fit cost (the report amortises it): real tokens through the feature model (the backbone,
    # or the policy for a head) forward (training, feature statistics, held-out evaluation, in every
    # process) and backward (training steps), and the gradient epochs (0: the ridge solver's exact head)
    epochs: int = 0
    forward_tokens: int = 0
    backward_tokens: int = 0


POOLINGS = ("last", "last+mean")


class ValueModel(nn.Module):
    """``pooling``: what the head reads at response position t. "last": the hidden state at t.
    "last+mean": that state beside the mean of the states from the last prompt token to t, so that an
    event anywhere in the response so far (a comma written, a capital used) stays visible to a linear
    head; the search keeps that mean as a running sum per row (``Boundary.policy_hidden_mean``)."""

    def __init__(self, kind: str, hidden_size: int, policy_name: str, backbone=None, tokenizer=None,
                 backbone_name: str | None = None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"value pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        if pooling != "last" and kind != "policy-head":
            raise ValueError(f"value pooling '{pooling}' needs the policy-head kind")
        self.kind, self.policy_name, self.backbone_name = kind, policy_name, backbone_name
        self.hidden_size, self.pooling = hidden_size, pooling
        features = hidden_size * (2 if pooling == "last+mean" else 1)
        self.head = nn.Linear(features, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # Per-feature standardisation, set from the training features at the start of a fit: LLM hidden
        # states have a few huge outlier dimensions that otherwise dominate a linear head.
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(features))
        self.backbone, self.tokenizer = backbone, tokenizer
        self.report: FitReport | None = None

    def head_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values on the head's device (the hidden states are moved there)."""
        standard = (hidden.to(self.head.weight.device, self.head.weight.dtype) - self.feature_mean) / self.feature_scale
        return self.head(standard).squeeze(-1)

    def max_length(self, policy=None) -> int | None:
        """Tokens the feature model was built for (its config), None when it names no limit."""
        from spi.models import model_max_length

        return model_max_length(self.backbone if self.kind == "backbone" else policy)

    def forward(self, input_ids, attention_mask, policy=None, starts=None) -> torch.Tensor:
        """V at every position [B, T] (the call that data-parallel engines wrap)."""
        return self.head_values(self.features(input_ids, attention_mask, policy, starts))

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """features: [positions, H] from the training data."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(features.std(0).clamp_min(1e-4))

    def features(self, input_ids, attention_mask, policy=None, starts=None) -> torch.Tensor:
        """What the head reads at every position, [B, T, F]: the hidden states of the backbone or the
        policy (on that model's device), with "last+mean" pooling their running mean from position
        ``starts[b]`` (the last prompt token) on."""
        from spi.models import model_device

        model = self.backbone if self.kind == "backbone" else policy.get_decoder()
        device = model_device(model)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        if self.pooling == "last":
            return hidden
        if starts is None:
            raise ValueError("'last+mean' value features need the response start of every sequence")
        return torch.cat([hidden, running_mean(hidden, torch.tensor(list(starts)).to(hidden.device))], -1)

    def score_sequences(self, sequences: list[list[int]], pad_id: int, policy=None, starts=None) -> torch.Tensor:
        """Value at the last token of each sequence (right-padded batch, no cache)."""
        ids, mask = pad_right(sequences, pad_id)
        hidden = self.features(ids, mask, policy, starts)
        mask = mask.to(hidden.device)
        last = hidden[torch.arange(len(sequences), device=hidden.device), mask.sum(-1) - 1]
        return self.head_values(last)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        head = {k: v.contiguous() for k, v in self.head.state_dict().items()}
        head.update(feature_mean=self.feature_mean.contiguous(), feature_scale=self.feature_scale.contiguous())
        save_file(head, folder / "head.safetensors")
        if self.kind == "backbone":
            backbone = self.backbone.merge_and_unload() if hasattr(self.backbone, "merge_and_unload") else self.backbone
            self.backbone = backbone
            backbone.save_pretrained(folder / "backbone")
            self.tokenizer.save_pretrained(folder / "backbone")
        meta = {
            "format_version": FORMAT_VERSION, "kind": self.kind, "hidden_size": self.hidden_size,
            "policy": self.policy_name, "backbone": self.backbone_name, "pooling": self.pooling,
            "report": asdict(self.report) if self.report else None,
            "checksums": _checksums(folder),
        }
        (folder / "value.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder


def _checksums(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "value.json")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def load_value_model(folder: str | Path, device: str = "cpu", dtype: str | None = None) -> ValueModel:
    """A saved value model on ``device``; ``dtype`` casts a backbone (None: as saved). A policy-head
    model must go to its policy's device, since it reads the policy's hidden states."""
    folder = Path(folder)
    meta_path = folder / "value.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not a value model folder (no value.json)")
    meta = json.loads(meta_path.read_text())
    actual = _checksums(folder)
    if actual != meta["checksums"]:
        bad = sorted(set(actual.items()) ^ set(meta["checksums"].items()))
        raise ValueError(f"value model {folder} fails its checksum ({', '.join(sorted({b[0] for b in bad}))})")
    backbone = tokenizer = None
    if meta["kind"] == "backbone":
        from transformers import AutoModel, AutoTokenizer

        from spi.models import torch_dtype

        kwargs = {"dtype": torch_dtype(dtype)} if dtype else {}
        backbone = AutoModel.from_pretrained(str(folder / "backbone"), **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "backbone"))
    model = ValueModel(meta["kind"], meta["hidden_size"], meta["policy"], backbone, tokenizer, meta["backbone"],
                       meta.get("pooling", "last"))
    weights = load_file(folder / "head.safetensors")
    model.feature_mean.copy_(weights.pop("feature_mean"))
    model.feature_scale.copy_(weights.pop("feature_scale"))
    model.head.load_state_dict(weights)
    model.report = FitReport(**meta["report"]) if meta.get("report") else None
    return model.to(device).eval()


def running_mean(hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> the mean of hidden[b, starts[b]..t] at every t >= starts[b] (hidden itself before)."""
    position = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    counted = (position >= starts[:, None]).to(hidden.dtype)
    sums = (hidden * counted[..., None]).cumsum(1)
    counts = counted.cumsum(1).clamp_min(1)[..., None]
    return torch.where(counted[..., None].bool(), sums / counts, hidden)


def response_starts(examples) -> list[int]:
    """The position of each example's last prompt token: where V(x, y_<0) is read."""
    return [len(e.prompt_ids) - 1 for e in examples]




@dataclass
class ValueExample:
    prompt_ids: list[int]
    response_ids: list[int]  # including the EOS token when the response ended
    reward: float
    group: str  # prompt key: hold-out splits by prompt, never within one




def fit_value(model: ValueModel, examples: list[ValueExample], pad_id: int, policy=None, epochs: int = 10,
              learning_rate: float = 1e-3, batch_size: int = 16, weight_decay: float = 0.0,
              holdout_fraction: float = 0.2, seed: int = 0, progress=None, solver: str = "adam",
              train=None) -> FitReport:
    """loss = 0.5 * mean over examples and response positions of (V(x, y_<t) - r(x, y))^2.

    solver "ridge" (head on frozen policy features only): the exact least-squares head with an L2
    penalty chosen by cross-validation over prompt groups, instead of ``epochs`` of AdamW.
    ``train`` (``spi.value_train.TrainSettings``): how the backbone kind trains (micro-batches,
    master weights, checkpointing, maximum length, data-parallel processes); ``batch_size`` is the
    effective batch of one optimizer step over all processes.
    """
    import time

    from spi.value_train import TrainSettings, train_backbone

    start = time.perf_counter()
    train = train or TrainSettings()
    groups = sorted({ex.group for ex in examples})
    random.Random(seed).shuffle(groups)
    held = set(groups[:int(len(groups) * holdout_fraction)]) if len(groups) > 1 else set()
    fit_set = [ex for ex in examples if ex.group not in held]
    holdout = [ex for ex in examples if ex.group in held]
    if not fit_set:
        raise ValueError("no training examples for the value fit")
    if solver == "ridge" and model.kind != "policy-head":
        raise ValueError("value.solver 'ridge' needs value.kind 'policy-head' (frozen features)")
    device = model.head.weight.device
    limit = train.max_length or model.max_length(policy)
    processes = train.accelerator.num_processes if train.accelerator else 1
    holdout_tokens = processes * input_tokens(holdout, limit)  # every process evaluates the held-out set
    if model.kind != "policy-head":
        loss_value, forward, backward = train_backbone(
            model, fit_set, pad_id, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
            weight_decay=weight_decay, seed=seed, progress=progress, settings=replace(train, max_length=limit))
        cost = {"epochs": epochs, "forward_tokens": forward + holdout_tokens, "backward_tokens": backward}
        return _finish(model, holdout, pad_id, policy, fit_set, loss_value, start, max_length=limit, cost=cost)

    # The head-only kind trains on frozen features: compute them once (on the policy's device).
    with torch.no_grad():
        train_batches, forward = [], holdout_tokens
        for s in range(0, len(fit_set), batch_size):
            chunk = fit_set[s:s + batch_size]
            ids, mask, positions, targets = batch_tensors(chunk, pad_id, device, limit)
            train_batches.append((model.features(ids, mask, policy, response_starts(chunk)).float(), positions, targets))
            forward += int(mask.sum())
    model.set_feature_stats(torch.cat([h[w.bool()] for h, w, _ in train_batches]))
    nn.init.constant_(model.head.bias, sum(e.reward for e in fit_set) / len(fit_set))
    if solver == "ridge":
        penalty, loss_value = fit_ridge_head(model, train_batches, [ex.group for ex in fit_set], seed)
        return _finish(model, holdout, pad_id, policy, fit_set, loss_value, start, penalty, limit,
                       {"epochs": 0, "forward_tokens": forward})
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(train_batches)))
    model.train()
    loss_value = float("nan")
    for epoch in range(epochs):
        order = random.Random(seed + epoch).sample(range(len(train_batches)), len(train_batches))
        total, weight = 0.0, 0.0
        for hidden, positions, targets in (train_batches[i] for i in order):
            values = model.head_values(hidden)
            loss = 0.5 * (((values - targets[:, None]) ** 2) * positions).sum() / positions.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * float(positions.sum())
            weight += float(positions.sum())
        loss_value = total / weight
        if progress:
            progress(epoch + 1, epochs, loss_value)
    return _finish(model, holdout, pad_id, policy, fit_set, loss_value, start, max_length=limit,
                   cost={"epochs": epochs, "forward_tokens": forward})


def _finish(model, holdout, pad_id, policy, train, loss_value, start, penalty=None, max_length=None,
            cost=None) -> FitReport:
    import time

    model.eval()
    nan = float("nan")
    mse, explained, pairs = (evaluate_value(model, holdout, pad_id, policy, pairs=True, max_length=max_length)
                             if holdout else (nan, nan, nan))
    model.report = FitReport(len(train), int(sum(len(e.response_ids) + 1 for e in train)), loss_value,
                             len(holdout), mse, explained, time.perf_counter() - start, pairs, penalty,
                             **(cost or {}))
    return model.report




@torch.inference_mode()
def evaluate_value(model: ValueModel, examples: list[ValueExample], pad_id: int, policy=None, pairs: bool = False,
                   max_length: int | None = None):
    """Mean squared error and explained variance of V over all response positions of ``examples``
    (and, with ``pairs``, the within-prompt pair accuracy of ``FitReport``)."""

    errors, targets_all, per_example = [], [], []
    for s in range(0, len(examples), 16):
        chunk = examples[s:s + 16]
        ids, mask, positions, targets = batch_tensors(chunk, pad_id, model.head.weight.device, max_length)
        positions = positions.bool()
        values = model(ids, mask, policy, response_starts(chunk)).float()
        targets = targets[:, None].expand_as(values)
        errors.append((values - targets)[positions])
        targets_all.append(targets[positions])
        per_example += [values[i][positions[i]] for i in range(len(chunk))]
    errors, targets_all = torch.cat(errors), torch.cat(targets_all)
    mse = float((errors ** 2).mean())
    variance = float(targets_all.var(unbiased=False))
    explained = (1 - mse / variance) if variance > 0 else float("nan")
    if not pairs:
        return mse, explained
    return mse, explained, _pair_accuracy(examples, per_example)


def _pair_accuracy(examples: list[ValueExample], values: list[torch.Tensor]) -> float:
    """Over pairs of leaves of one prompt with different rewards and every prefix length both have:
    the fraction where V ranks the prefixes as the rewards rank the leaves (ties count 1/2)."""
    right, total = 0.0, 0
    for i, a in enumerate(examples):
        for j in range(i + 1, len(examples)):
            b = examples[j]
            if a.group != b.group or a.reward == b.reward:
                continue
            steps = min(len(values[i]), len(values[j]))
            sign = 1.0 if a.reward > b.reward else -1.0
            diff = (values[i][:steps] - values[j][:steps]) * sign
            right += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
            total += steps
    return right / total if total else float("nan")


def new_value_model(kind: str, policy, policy_name: str, backbone_name: str | None = None,
                    lora_rank: int = 0, dtype: str = "float32", device: str | None = None,
                    init_from_reward: bool = False, pooling: str = "last") -> ValueModel:
    """A fresh value model. The policy-head kind sits on the policy's device and reads its states with
    ``pooling``; a backbone is loaded in
    ``dtype`` on ``device`` (None: the CPU). ``init_from_reward``: the backbone and the head come from
    the sequence-classification reward model ``backbone_name`` (IRO initialises V_k so), the head set so
    that V equals the reward model's score at every position before the fit. A backbone keeps its own
    tokenizer: when it is not the policy's, its examples and guides re-encode text."""
    from spi.models import model_device

    if kind == "policy-head":
        return ValueModel(kind, policy.config.hidden_size, policy_name, pooling=pooling).to(model_device(policy))
    from spi.models import load_causal_lm, load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(backbone_name)
    reward_head = None
    if init_from_reward:
        scorer = load_sequence_classifier(backbone_name, dtype, device or "cpu")
        score = getattr(scorer, "score", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"value.init_from_reward: '{backbone_name}' has no one-logit 'score' head on its "
                             "last hidden state (a decoder reward model such as a Llama/Mistral RM is needed)")
        backbone = getattr(scorer, scorer.base_model_prefix)
        bias = score.bias.detach().float() if score.bias is not None else torch.zeros(1)
        reward_head = (score.weight.detach().float()[0], bias)
    else:
        backbone = load_causal_lm(backbone_name, dtype, device or "cpu").get_decoder()
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                       target_modules=["q_proj", "v_proj"]))
    for p in backbone.parameters():
        p.requires_grad_(lora_rank == 0 or p.requires_grad)
    model = ValueModel(kind, backbone.config.hidden_size, policy_name, backbone.train(), tokenizer, backbone_name)
    model.reward_head = reward_head
    return model.to(model_device(backbone))
