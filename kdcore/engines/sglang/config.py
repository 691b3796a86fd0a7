"""The ``sglang`` engines' recipe section and the checks that need neither torch nor sglang.

Imported by :mod:`kdcore.recipe.loading` (recipe validation) and by the engine modules; it imports
neither torch nor sglang (one-way: kdcore.recipe.loading -> here, never back), so validating a recipe
stays light. The facts behind the constants were read from the sglang 0.5.23 wheel (see
``kdcore/engines/sglang/README.md``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from kdcore.engines.protocol import TeacherError


@dataclass
class SGLangConfig:
    """An SGLang server (GPU only; see kdcore/engines/sglang/ and docs/gpu.md)."""

    tp_size: int = 1  # tensor parallel ranks of the teacher engine
    dp_size: int = 1  # data parallel replicas of the teacher engine
    mem_fraction_static: float = 0.4  # leaves room for the colocated student on the same GPU
    quantization: Optional[str] = None  # e.g. "fp8": a teacher only needs forward precision
    colocate: bool = False  # release teacher memory while the student trains (sleep/wake)
    offload_optimizer: bool = False  # with colocate: optimizer state on CPU while the teacher runs
    # hook: kdflow's SGLang plugin writes rows straight into the student's GPU slot; lists:
    # SGLang's own JSON float lists (exact, far slower)
    transport: str = field(default="auto", metadata={"choices": ("auto", "hook", "lists")})  # auto: hook where the server runs it
    server_url: Optional[str] = None  # a server already running on this node; None = start one
    port: int = 0  # of the server kdflow starts; 0 = any free port (set it when ranks share one)
    base_gpu_id: int = 0  # first GPU of the server kdflow starts (tp_size * dp_size from there)
    server_args: Dict[str, Any] = field(default_factory=dict)  # more sglang ServerArgs, passed as is


# value checks of the section beyond types: (key, predicate, message); the schema applies them to
# teacher.sglang and rollout.sglang whatever the engine (kdcore.recipe.schema.RANGES)
RANGES: tuple[tuple[str, Any, str], ...] = (
    ("tp_size", lambda v: v >= 1, "must be >= 1"),
    ("dp_size", lambda v: v >= 1, "must be >= 1"),
    ("mem_fraction_static", lambda v: 0.0 < v < 1.0, "must be within (0, 1)"),
    ("port", lambda v: 0 <= v <= 65535, "must be a port number (0 = any free one)"),
    ("base_gpu_id", lambda v: v >= 0, "must be >= 0"),
)

SGLANG_VERSION = "0.5.23"  # the one version this module was written against (pyproject's extra pins it)
HOOK_ENV = "KDFLOW_SGLANG_HOOK"  # "1" in a server's environment activates kdflow's plugin there
ANY_VERSION_ENV = "KDFLOW_SGLANG_ANY_VERSION"  # "1": try another sglang version anyway (unsupported)
ANY_ARCH_ENV = "KDFLOW_SGLANG_ANY_ARCH"  # "1": accept an unverified architecture (the probe still checks)

# Architectures whose SGLang 0.5.23 model class hands the final-norm output to the logits
# processor (llama.py, mistral.py (a LlamaForCausalLM), qwen2.py, qwen3.py, qwen3_moe.py).
VERIFIED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                          "Qwen3MoeForCausalLM")

# sglang 0.5.23 srt/arg_groups/choices.py QUANTIZATION_CHOICES, so recipes fail at validation
# rather than minutes later at server start.
SGLANG_QUANTIZATIONS = (
    "awq", "fp8", "mxfp8", "gptq", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf", "modelopt", "modelopt_fp8",
    "modelopt_fp4", "nvfp4_online", "modelopt_mixed", "petit_nvfp4", "w8a8_int8", "w8a8_fp8", "moe_wna16", "w4afp8",
    "mxfp4", "auto-round", "auto-round-int8", "compressed-tensors", "modelslim", "mxfp_w4a8", "quark",
    "quark_int4fp8_moe", "quark_mxfp4", "mlx_q4", "mlx_q8", "unquant", "humming",
)

# Server arguments the hidden-state path depends on; a recipe's server_args may not change them.
TEACHER_FIXED_ARGS: dict[str, Any] = {
    "skip_tokenizer_init": True,  # token ids in, no text out: kdflow never sends text
    "enable_return_hidden_states": True,  # capture the hidden state of every prompt position
    "disable_radix_cache": True,  # a cached prefix is not recomputed: its positions would be missing
    "chunked_prefill_size": -1,  # a chunked prompt only stores its last chunk's states
    "disable_overlap_schedule": True,  # overlap copies hidden states to host before the hook sees them
}
# Defaults a recipe may override: a prefill-only teacher never decodes, and capturing CUDA
# graphs costs start-up time and memory for nothing (the prefill graph is off as well: its
# interaction with full hidden-state capture is unverified).
TEACHER_DEFAULT_ARGS: dict[str, Any] = {"disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True}
# sglang 0.5.23 ServerArgs flags declared with argparse.BooleanOptionalAction: False is
# ``--no-<flag>`` (their default may be None or True, so leaving the flag out is not False).
# Every other boolean is store_true with default False: False is the flag left out.
# tests/integration/test_sglang_contracts.py re-derives this set from SGLang's own parser.
SGLANG_NEGATABLE_FLAGS = frozenset({
    "enable_tf32_matmul", "dcp_replicate_q_proj", "enable_tp_lm_head_all_to_all", "enable_fused_qk_norm_rope",
    "speculative_enable_w4a4_mxfp4_megamoe", "mm_enable_dp_encoder", "experts_shared_outer_loras",
    "lora_strict_loading", "dllm_fdfo", "ple_offload_embedding", "enable_decoder_swa_bounded_replay",
    "enable_dsa_fused_indexer",
})
MIN_PREFILL_TOKENS = 16384  # sglang's own default max_prefill_tokens; raised to a whole micro-batch


def installed_version(dist: str = "sglang") -> Optional[str]:
    """Version of an installed distribution, read from its metadata (never imports it)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_version(found: Optional[str], pin: str = SGLANG_VERSION) -> None:
    """Raise :class:`TeacherError` unless ``found`` is the pinned SGLang version."""
    if found is None:
        raise TeacherError(f"the sglang engine needs sglang=={pin}, which is not installed here: "
                           f"`pip install 'kdflow[sglang]'` on a CUDA machine (it does not install on CPU-only ones)")
    if found != pin and os.environ.get(ANY_VERSION_ENV) != "1":
        raise TeacherError(f"kdflow's sglang engine is written against sglang=={pin}, found {found}: install the "
                           f"pinned version (`pip install 'kdflow[sglang]'`), or set {ANY_VERSION_ENV}=1 to try "
                           f"anyway (the hidden-state hook then stays off and the slow 'lists' transport is used)")


def check_cuda() -> None:
    import torch  # here, not at the top: recipe validation imports this module without torch

    if not torch.cuda.is_available():
        raise TeacherError("teacher.engine 'sglang' needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                           "use teacher.engine=hf on CPU")


def check_architecture(config: Mapping[str, Any], where: str = "the teacher") -> str:
    """The model's architecture name; :class:`TeacherError` unless SGLang's hidden states for
    it are known to be post-norm (override with ``KDFLOW_SGLANG_ANY_ARCH=1``)."""
    archs = list(config.get("architectures") or [])
    arch = archs[0] if archs else str(config.get("model_type", "?"))
    if arch not in VERIFIED_ARCHITECTURES and os.environ.get(ANY_ARCH_ENV) != "1":
        raise TeacherError(
            f"{where} is a {arch}; kdflow has only verified that SGLang {SGLANG_VERSION} returns post-norm hidden "
            f"states for {', '.join(VERIFIED_ARCHITECTURES)} (some models return pre-norm states). Use "
            f"teacher.engine=hf, or set {ANY_ARCH_ENV}=1 to rely on the start-up post-norm probe alone")
    return arch


def check_recipe_section(section: Mapping[str, Any], prefix: str = "teacher", *, role: str = "teacher") -> list[str]:
    """Problems with a recipe section (``teacher`` or ``rollout``) whose ``engine`` is sglang,
    one string each. ``role`` ``rollout``: a sampling server, which does not need the
    hidden-state path's fixed server arguments."""
    if role not in ("teacher", "rollout"):
        raise ValueError(f"role must be 'teacher' or 'rollout', got '{role}'")
    teacher = section
    errors = []
    if teacher.get("device") == "cpu":
        errors.append(f"{prefix}.device: 'cpu' cannot run the sglang engine (CUDA only); use 'cuda' or 'auto'")
    s = teacher.get("sglang") or {}
    if not isinstance(s, Mapping):
        return errors
    q = s.get("quantization")
    if isinstance(q, str) and q not in SGLANG_QUANTIZATIONS:
        near = difflib.get_close_matches(q, SGLANG_QUANTIZATIONS, n=1)
        errors.append(f"{prefix}.sglang.quantization: '{q}' is not a quantization sglang {SGLANG_VERSION} knows"
                      + (f"; did you mean '{near[0]}'?" if near else f" ({', '.join(SGLANG_QUANTIZATIONS)})"))
    url = s.get("server_url")
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        errors.append(f"{prefix}.sglang.server_url: '{url}' must start with http:// or https://")
    extra = s.get("server_args") or {}
    if isinstance(extra, Mapping):
        for k in extra:
            if not (isinstance(k, str) and k.isidentifier()):
                errors.append(f"{prefix}.sglang.server_args: '{k}' is not an sglang ServerArgs name (use_underscores)")
            elif role == "teacher" and k in TEACHER_FIXED_ARGS and extra[k] != TEACHER_FIXED_ARGS[k]:
                errors.append(f"{prefix}.sglang.server_args.{k}: kdflow's hidden-state path needs "
                              f"{k}={TEACHER_FIXED_ARGS[k]!r}")
            elif k in ("tp_size", "dp_size", "mem_fraction_static", "quantization", "port", "base_gpu_id",
                       "model_path", "dtype", "enable_memory_saver"):
                where = f"{prefix}.sglang / {prefix}.dtype" + (f" / {prefix}.path" if role == "teacher" else "")
                errors.append(f"{prefix}.sglang.server_args.{k}: set it through the recipe ({where}), not server_args")
    return errors
