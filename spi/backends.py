"""Generation backends: what runs the search for a recipe's ``execution.backend``.

``transformers`` (the default) is ``spi.search.search`` on a ``spi.models.CausalLM``; ``vllm`` is
``spi.vllm_search.search`` on a vLLM engine, for GPU workers (see :class:`VLLMBackend`).
"""

from __future__ import annotations

import importlib.util


class BackendUnavailable(RuntimeError):
    """The recipe's generation backend cannot run here; the message says why and what to do."""


_ENGINES: dict = {}  # (model, engine kwargs) -> vllm.LLM, built once per process


def release_engines() -> int:
    """Drop this process's vLLM engines and free their GPU memory (the value fit needs those devices);
    the next search builds its engine again. Returns how many were dropped."""
    dropped = len(_ENGINES)
    if not dropped:
        return 0
    _ENGINES.clear()
    import gc

    gc.collect()
    try:  # vLLM keeps its tensor-parallel group alive past the engine: tear it down as its docs show
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dropped


class TransformersBackend:
    """The default: ``spi.search.search`` (CBS with a reordered KV cache) on a transformers model."""

    name = "transformers"

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        from spi.search import search

        return search(
            policy, instructions, seeds, settings, guide, reward_model=reward_model, progress=progress
        )


class VLLMBackend:
    """CBS on a vLLM engine (``spi.vllm_search``), prefix caching on: every chunk re-submits each kept
    prefix, so the shared prompt and the kept beams are prefilled from the cache.

    ``engine``: a ready ``vllm.LLM`` (or anything with its ``generate`` contract); without one, the engine
    is built on first use from the policy's folder or hub id, with ``engine_kwargs``. Constructing it
    without an engine where vLLM or a CUDA device is missing raises :class:`BackendUnavailable`.
    Guides score rows through tokens only (``Guide.score_prefixes``); a policy-head value guide reads
    the hidden states of the transformers copy of the policy that the caller passes as ``policy``.
    """

    name = "vllm"

    def __init__(self, engine=None, require_gpu: bool = True, sampling_params=None, **engine_kwargs):
        if engine is None:
            problem = vllm_unavailable_reason(require_gpu)
            if problem:
                raise BackendUnavailable(
                    f"execution.backend 'vllm' cannot run here: {problem}; "
                    "use execution.backend 'transformers' or run the shards on a GPU worker "
                    "whose image has vLLM (pip install vllm)"
                )
        self.engine, self.sampling_params = engine, sampling_params
        self.engine_kwargs = {"enable_prefix_caching": True, **engine_kwargs}

    def engine_for(self, policy):
        if self.engine is None:
            from vllm import LLM

            from spi.models import resolve

            model = str(resolve(policy.name))
            key = (model, tuple(sorted(self.engine_kwargs.items())))
            if key not in _ENGINES:  # one engine per process and model: stages call backend_for repeatedly
                _ENGINES[key] = LLM(model=model, **self.engine_kwargs)
            self.engine = _ENGINES[key]
        return self.engine

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        from spi.vllm_search import search

        return search(self.engine_for(policy), policy, instructions, seeds, settings, guide,
                      reward_model=reward_model, progress=progress, sampling_params=self.sampling_params)


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
    if name == "vllm":
        return VLLMBackend(dtype=recipe.policy.dtype, tensor_parallel_size=recipe.execution.tensor_parallel_size)
    return BACKENDS[name]()
