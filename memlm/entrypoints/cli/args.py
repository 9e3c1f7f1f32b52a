"""Arguments shared by the generation commands (generate, chat, info) and the `LLM` they build.

Owns: the model / engine flags and the sampling flags, their help (every default is read from
where it is defined: `memlm.engine.config`, `memlm.models.registry`, the constants below), and
turning parsed flags into `SamplingParams` and an `LLM`.
Does not know: what a command does with them.
"""
from __future__ import annotations

import argparse

from memlm import dtypes
from memlm.engine import config as engine_config
from memlm.models.registry import DEFAULT_MODEL

# The command line's sampling defaults: greedy, with room for a reply (SamplingParams' own
# defaults are vLLM's: temperature 1, 16 tokens).
MAX_TOKENS = 256
TEMPERATURE = 0.0
TOP_P = 1.0
TOP_K = 0

# Engine knobs the flags below may set, by their EngineConfig / LLM keyword.
ENGINE_KNOBS = ("max_num_seqs", "max_num_batched_tokens", "kv_dtype", "num_threads", "weight_dtype",
                "weight_group_size", "warm_fraction", "disk_budget", "session_dir",
                "enable_prefix_caching", "prefix_cache_policy")


def add_model_args(p: argparse.ArgumentParser,
                   batched_tokens: int = engine_config.MAX_NUM_BATCHED_TOKENS) -> None:
    """--model, --memory-budget, --device and the engine knobs; `batched_tokens`: the command's
    default step (--max-num-batched-tokens), the engine's own unless the command has its own."""
    from memlm.entrypoints.llm import WEIGHT_DTYPES
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="model name, .gguf file or Hugging Face directory (default: %(default)s)")
    p.add_argument("--memory-budget", default=None,
                   help="bound on the whole process's memory, e.g. 1GiB (default: a fraction of available RAM)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"sequences batched at once (default {engine_config.MAX_NUM_SEQS}; one for a "
                        "single prompt or a chat)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=None if batched_tokens == engine_config.MAX_NUM_BATCHED_TOKENS else batched_tokens,
                   help=f"tokens per engine step, prefill chunks + decodes (default {batched_tokens})")
    p.add_argument("--kv-dtype", default=None, metavar="{" + ",".join(
                       [dtypes.AUTO, *engine_config.KV_DTYPES]) + "}",
                   choices=dtypes.choices(engine_config.KV_DTYPES, allow_auto=True),
                   help="KV cache storage (default auto: fp16 on CPU with the native kernel, else "
                        "fp32; attention is computed in fp32)")
    p.add_argument("--weight-dtype", "--dtype", dest="weight_dtype", default=None,
                   metavar="{" + ",".join([dtypes.AUTO, *WEIGHT_DTYPES]) + "}",
                   choices=dtypes.choices(WEIGHT_DTYPES, allow_auto=True),
                   help="weights and matmuls (default auto: bf16 where bf16 matmuls are fast here, "
                        "else fp32); int8 / int4 quantize the weights on load (CPU)")
    from memlm.kernels.quant import INT4_DEFAULT_GROUP, INT4_GROUP_SIZES
    p.add_argument("--weight-group-size", type=int, default=None, choices=INT4_GROUP_SIZES,
                   help=f"inputs per scale of int4 weights (default {INT4_DEFAULT_GROUP})")
    p.add_argument("--warm-fraction", type=float, default=None,
                   help=f"share of the budget's KV memory for the warm tier: compressed KV of swapped-out "
                        f"requests and idle chat sessions (default {engine_config.WARM_FRACTION}: off)")
    p.add_argument("--session-dir", default=None,
                   help="directory of the cold KV tier: persistent chat sessions (and swap spill)")
    p.add_argument("--disk-budget", default=None,
                   help=f"bound on the files in --session-dir (default {engine_config.DISK_BUDGET})")
    from memlm.kv.prefix_eviction import POLICIES as PREFIX_CACHE_POLICIES
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const",
                   const=False, default=None,
                   help="do not reuse the KV of prompt prefixes seen before (default: reuse them)")
    p.add_argument("--prefix-cache-policy", default=None, choices=PREFIX_CACHE_POLICIES,
                   help=f"which cached prefix block is reclaimed first: lru, or cost (frequency x "
                        f"recompute cost, leaves first) (default {engine_config.PREFIX_CACHE_POLICY})")
    p.add_argument("--threads", dest="num_threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; 1 can be faster on a busy machine)")


def add_kv_policy_args(p: argparse.ArgumentParser) -> None:
    """--kv-policy, --kv-window, --kv-sinks, --kv-budget (memlm.kv.policies; SamplingParams fields)."""
    from memlm.kv.policies import POLICIES
    p.add_argument("--kv-policy", default=None, choices=POLICIES,
                   help=f"KV eviction per sequence (default {engine_config.KV_POLICY}): window / sinks run "
                        "past the model's context in flat memory; h2o / snap keep --kv-budget tokens")
    p.add_argument("--kv-window", type=int, default=None,
                   help=f"recent tokens kept (default {engine_config.KV_WINDOW}; h2o / snap: half the budget)")
    p.add_argument("--kv-sinks", type=int, default=None,
                   help=f"first tokens always kept (default {engine_config.KV_SINKS})")
    p.add_argument("--kv-budget", type=int, default=None,
                   help=f"most cached tokens per sequence, h2o / snap (default {engine_config.KV_BUDGET})")


def kv_policy_fields(args) -> dict:
    """The SamplingParams kv_* fields of the flags that were given."""
    return {k: getattr(args, k) for k in ("kv_policy", "kv_window", "kv_sinks", "kv_budget")
            if getattr(args, k, None) is not None}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help="most new tokens per reply (default %(default)s)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="(default %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="0 = off (default %(default)s)")
    p.add_argument("--seed", type=int, default=None)
    add_kv_policy_args(p)


def sampling_params(args):
    from memlm.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, **kv_policy_fields(args))


def engine_kwargs(args) -> dict:
    """The LLM keywords of the engine flags that were given (the rest keep LLM's defaults)."""
    return {k: getattr(args, k) for k in ENGINE_KNOBS if getattr(args, k, None) is not None}


def make_llm(args, num_seqs: int | None = None):
    """The LLM for a command; `num_seqs` (sequences it will ever run at once) caps max_num_seqs
    unless --max-num-seqs is given, so one chat does not claim a full-size KV pool."""
    from memlm.entrypoints import llm
    kwargs = {"model": args.model}
    if num_seqs is not None and getattr(args, "max_num_seqs", None) is None:
        kwargs["max_num_seqs"] = max(1, min(engine_config.MAX_NUM_SEQS, num_seqs))
    if args.memory_budget is not None:
        kwargs["memory_budget"] = args.memory_budget
    if args.device is not None:
        kwargs["device"] = args.device
    kwargs.update(engine_kwargs(args))
    return llm.LLM(**kwargs)
