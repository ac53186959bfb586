"""Generation backends: what runs the search for a recipe's ``execution.backend``.

``transformers`` (the default) is ``spi.search.search`` on a ``spi.models.CausalLM``; ``vllm`` is the
seam for GPU workers (see :class:`VLLMBackend` for what exists).
"""

from __future__ import annotations

import importlib.util


class BackendUnavailable(RuntimeError):
    """The recipe's generation backend cannot run here; the message says why and what to do."""


class TransformersBackend:
    """The default: ``spi.search.search`` (CBS with a reordered KV cache) on a transformers model."""

    name = "transformers"

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        from spi.search import search

        return search(
            policy, instructions, seeds, settings, guide, reward_model=reward_model, progress=progress
        )


class VLLMBackend:
    """vLLM for GPU workers (prefix caching on: CBS re-submits every kept prefix at each chunk boundary,
    so the prefill of the shared prompt and of each kept beam is served from the cache).

    Status: the seam and the availability check exist; chunk-level search on vLLM is not implemented
    (it needs the guide's scores on vLLM's sampled prefixes and a token-exact sampler matching
    ``spi.sampling`` for seeds to mean the same thing). Constructing it where vLLM or a CUDA device is
    missing raises :class:`BackendUnavailable` with the reason.
    """

    name = "vllm"

    def __init__(self, require_gpu: bool = True):
        problem = vllm_unavailable_reason(require_gpu)
        if problem:
            raise BackendUnavailable(
                f"execution.backend 'vllm' cannot run here: {problem}; "
                "use execution.backend 'transformers' or run the shards on a GPU worker "
                "whose image has vLLM (pip install vllm)"
            )
        self.engine_kwargs = {"enable_prefix_caching": True}

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        raise NotImplementedError(
            "chunk-level guided search on vLLM is not implemented yet; execution.backend 'transformers' "
            "runs the same recipe"
        )


def vllm_unavailable_reason(require_gpu: bool = True) -> str | None:
    """Why the vLLM backend cannot run in this process, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if require_gpu:
        import torch

        if not torch.cuda.is_available():
            return "vLLM needs a CUDA GPU and none is visible"
    return None


BACKENDS = {"transformers": TransformersBackend, "vllm": VLLMBackend}


def backend_for(recipe):
    name = recipe.execution.backend
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend '{name}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()
