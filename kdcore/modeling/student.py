"""The student: build from the recipe, wrap with FSDP2, optimizer, schedule, precision.

Build (``student.init``):
  * ``pretrained`` — load ``student.path`` (or the teacher's path when unset) as is;
  * ``truncate`` — load it and keep ``num_layers`` evenly spaced decoder layers, first and last
    included (DistilBERT-style), renumbering ``layer_idx`` so KV caching keeps working;
  * ``config`` — same architecture with ``config_overrides``, randomly initialised from
    ``train.seed`` (identical on every rank).

LoRA (``student.lora.enabled``): the built model is wrapped with peft adapters
(:mod:`kdcore.modeling.lora`) before sharding; only the adapters train, and the functions below find the
decoder stack and head of the base model through the wrapper.

Sharding, where :func:`uses_fsdp` (several ranks, or a compute dtype other than fp32):
``fully_shard`` on each decoder layer, then on the root, which therefore owns the embedding, the
final norm and ``lm_head`` (tied or not: a tied pair is one parameter in one FSDP unit, so it
stays tied). FSDP2 does not reshard the root after forward, so between
:func:`student_hidden` and ``backward`` the root's parameters are the gathered, unsharded
tensors; :func:`student_head_weight` hands that full ``[V, H]`` weight to the loss driver, whose
per-chunk ``h @ W.T`` gradients accumulate into it and are reduce-scattered by FSDP at the end
of backward, together with the embedding's gradient when tied. One rank in fp32 trains the plain
module (the same arithmetic, bit for bit): there FSDP2 has nothing to shard or cast, and its copy
of each unit's weights while in use cost the real quickstart student 209-216 MB resident
(``python -m bench fsdp_one_rank``).

Gradient reduction convention: gradients are **averaged** over ranks (FSDP's default, and the
same for ``extra_modules``). For an exact token-mean over the global batch, each rank's loss must
be ``world_size * (sum of its token losses) / (global token count of the optimizer step)``;
:func:`loss_scale` returns that factor.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from kdcore.infra import distributed as kdist
from kdcore.modeling import lora as kdlora
from kdcore.modeling.models import load_causal_lm, locate
from kdcore.modeling.vision import language_layers, model_class, freeze_vision, vision_blocks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# loading and building


def _transformers_dtype_kw(dtype: torch.dtype) -> dict:
    import transformers

    # transformers 5 renamed torch_dtype= to dtype= (4.56 accepts both)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_pretrained(spec: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM (hub id, local folder, ``.gguf`` file or ``pkg://`` spec) on CPU, via
    :func:`kdcore.modeling.models.load_causal_lm` (GGUF converted once into a cached plain HF folder)."""
    return load_causal_lm(spec, dtype=dtype, device="cpu")


def load_config(spec: str):
    """The model config of ``spec`` (same forms as :func:`load_pretrained`), without weights."""
    from transformers import AutoConfig

    kind, where = locate(spec)  # a missing local path raises ModelNotFoundError naming it
    if kind == "gguf":
        from pathlib import Path

        # reads only the GGUF metadata; the quantization marker would follow into save_pretrained
        cfg = AutoConfig.from_pretrained(str(Path(where).parent), gguf_file=Path(where).name)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        return cfg
    return AutoConfig.from_pretrained(where)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama/Qwen/Mistral-style causal LM (``model.model.layers``;
    a peft-wrapped one's base model)."""
    model = kdlora.unwrap(model)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None and base is not None:
        layers = language_layers(base)  # a vision-language model's language model
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected decoder layers at model.model.layers "
                        "(Llama/Qwen/Mistral-style causal LM)")
    return layers


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` indices out of ``range(total)``, evenly spaced, first and last included
    (``keep == 1`` keeps the first)."""
    if not 1 <= keep <= total:
        raise ValueError(f"num_layers must be within [1, {total}] for a {total}-layer model, got {keep}")
    if keep == 1:
        return [0]
    # round half up (Python's round() is half-to-even, which skews the spacing)
    return [int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)]


# per-layer lists in configs that must follow the kept layers
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def truncate_layers(model: nn.Module, num_layers: int) -> list[int]:
    """Keep ``num_layers`` evenly spaced decoder layers in place; return the kept source indices.

    Updates ``config.num_hidden_layers`` and per-layer config lists (``layer_types`` ...), and
    renumbers every ``layer_idx`` attribute inside the kept layers (attention modules index the
    KV cache with it).
    """
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        raise ValueError(f"student.init=truncate needs the decoder layers at model.model.layers; "
                         f"{type(model).__name__} keeps them elsewhere (use init=config for it)")
    layers = decoder_layers(model)
    total = len(layers)
    kept = evenly_spaced(total, num_layers)
    new = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    model.model.layers = new
    cfg = model.config
    for name in _PER_LAYER_CONFIG_LISTS:
        val = getattr(cfg, name, None)
        if isinstance(val, (list, tuple)) and len(val) == total:
            setattr(cfg, name, [val[i] for i in kept])
    cfg.num_hidden_layers = num_layers
    return kept


def _apply_overrides(cfg, overrides: dict) -> None:
    known = set(cfg.to_dict())
    old_layers = getattr(cfg, "num_hidden_layers", None)
    for key, val in overrides.items():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"student.config_overrides: '{key}' is not a field of {type(cfg).__name__}{hint}")
        setattr(cfg, key, val)
    n = getattr(cfg, "num_hidden_layers", None)
    if n == old_layers:
        return
    # per-layer lists must follow a new depth; a uniform list resizes, a mixed one is ambiguous
    for name in _PER_LAYER_CONFIG_LISTS:
        val = getattr(cfg, name, None)
        if name in overrides or not isinstance(val, (list, tuple)) or len(val) == n:
            continue
        if len(set(map(str, val))) > 1:
            raise ValueError(f"student.config_overrides: num_hidden_layers={n} also needs '{name}' "
                             f"({len(val)} mixed per-layer entries in the source config)")
        setattr(cfg, name, [val[0]] * n if val else [])


class StudentInitError(ValueError):
    """The recipe's student section cannot build the student it describes (one line)."""


def build_student(recipe, seed: int | None = None):
    """The student model from a recipe (full, unsharded, fp32 master weights on CPU).

    ``recipe`` is a :class:`kdcore.recipe.loading.Recipe`-shaped config; the source checkpoint is
    ``student.path`` or, when unset, ``teacher.path``; ``seed`` defaults to ``train.seed``.
    """
    s = recipe.student
    source = s.path or recipe.teacher.path
    seed = recipe.train.seed if seed is None else seed
    if s.init == "config":
        cfg = load_config(source)
        _apply_overrides(cfg, dict(s.config_overrides or {}))
        # the same seed on every rank gives the same initial weights everywhere
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(cfg).from_config(cfg, **_transformers_dtype_kw(torch.float32))
    else:
        if s.config_overrides:
            raise StudentInitError(f"student.config_overrides only applies to init=config, not init={s.init}")
        model = load_pretrained(source, dtype=torch.float32)
        if s.init == "truncate":
            if not s.num_layers:
                raise StudentInitError("student.num_layers is required when student.init is 'truncate'")
            truncate_layers(model, int(s.num_layers))
    check_num_layers(model, s, source)
    if s.gradient_checkpointing:
        # non-reentrant checkpointing is the variant that composes with FSDP2
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards never need a KV cache
    if not getattr(s, "train_vision", True):
        freeze_vision(model)  # before LoRA and the optimizer: frozen weights get no state
    if kdlora.lora_enabled(getattr(s, "lora", None)):
        # adapters initialise from the global RNG: the same seed gives every rank the same ones
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = kdlora.apply_lora(model, s.lora)
    model.train()  # loaders hand out eval-mode models; checkpointing and dropout need train mode
    return model


def check_num_layers(model, s, source) -> None:
    """``student.num_layers`` only cuts layers under ``init: truncate``; elsewhere it must state
    the student's own count, so a recipe switched to ``init: pretrained`` (a warm start from an
    export) keeps its meaning instead of being silently ignored."""
    if not s.num_layers or s.init == "truncate":
        return
    have = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)
    if have and have != int(s.num_layers):
        how = "config_overrides.num_hidden_layers" if s.init == "config" else "init: truncate"
        raise StudentInitError(f"student.num_layers={s.num_layers}, but the init={s.init} student from '{source}' has "
                         f"{have} layers; num_layers only cuts layers with {how}: drop it or set it to {have}")


# --------------------------------------------------------------------------------------------
# sharding and the loss-driver interface


def mixed_precision_policy(precision: str):
    """FSDP2 policy: ``bf16`` = bf16 compute params and fp32 gradient reduction; ``fp32`` = None."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in _DTYPES:
        raise ValueError(f"train.precision must be one of {', '.join(_DTYPES)}, got '{precision}'")
    if precision == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def uses_fsdp(world_size: int, precision: str) -> bool:
    """Whether the student is wrapped with FSDP2: only where it has work to do, sharding over
    several ranks or casting to a compute dtype (``bf16``: fp32 masters, bf16 copies gathered for
    compute). On one rank in fp32 the plain module trains with the same arithmetic: FSDP2 would copy
    every unit's weights into an unsharded buffer before use and keep the root's (embedding, head)
    from forward to backward, memory and time for nothing."""
    return world_size > 1 or mixed_precision_policy(precision) is not None


def shard_student(model: nn.Module, precision: str = "fp32", device: torch.device | str | None = None,
                  mesh=None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer and to the root (in place; returns it).

    Needs a process group (:func:`kdcore.infra.distributed.init_distributed`). The mesh defaults to a
    1-D mesh over all ranks on ``device`` (default: the one from ``init_distributed``). Layers
    reshard after forward (memory); the root keeps its parameters gathered from forward to
    backward, which :func:`student_head_weight` relies on.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not kdist.is_initialized():
        raise RuntimeError("shard_student needs a process group: call kdcore.infra.distributed.init_distributed() first")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise TypeError(f"{type(model).__name__}: the loss driver needs a bias-free lm_head (got {head!r})")
    if mesh is None:
        dev = torch.device(device) if device is not None else kdist.init_distributed().device
        mesh = init_device_mesh(dev.type, (kdist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh}
    mp = mixed_precision_policy(precision)
    if mp is not None:
        kw["mp_policy"] = mp

    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    for block in vision_blocks(kdlora.unwrap(model)):
        if any(p.requires_grad for p in block.parameters()):  # a frozen tower stays in the root unit
            fully_shard(block, **kw)
    # reshard_after_forward left at its default on the root: FSDP2 then keeps the root gathered
    # until backward (the head weight must stay full between student_hidden and backward)
    fully_shard(model, **kw)
    return model


def _base_model(model: nn.Module) -> nn.Module:
    model = kdlora.unwrap(model)
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"{type(model).__name__}: expected the decoder stack at model.model")
    return base


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    cached = getattr(model, "_kdflow_logits_to_keep", None)
    if cached is None:
        # a peft wrapper passes keyword arguments through to the causal LM it wraps
        cached = "logits_to_keep" in inspect.signature(type(kdlora.unwrap(model)).forward).parameters
        model._kdflow_logits_to_keep = cached
    return cached


def student_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **vision: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` after the final norm, without the ``lm_head`` matmul.

    ``vision``: a vision-language student's pixel inputs (:func:`kdcore.modeling.vision.model_inputs`).

    Runs the root module's forward (so FSDP gathers the root's parameters and registers its
    backward hooks) with ``logits_to_keep`` = no position, and takes the decoder stack's output.
    Dtype is the compute dtype (bf16 under bf16 mixed precision).
    """
    captured: list[torch.Tensor] = []

    def grab(_mod, _args, out):
        captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = _base_model(model).register_forward_hook(grab)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **vision}
    if _accepts_logits_to_keep(model):
        # an empty index list: lm_head runs on [B, 0, H], so no [B, L, V] logits are formed
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder-stack output per forward, got {len(captured)}")
    return captured[0]


def student_head_weight(model: nn.Module) -> torch.Tensor:
    """The full ``[V, H]`` output-projection weight (``lm_head``, or the tied embedding).

    Under FSDP2 it is valid from :func:`student_hidden` until ``backward`` of the same step: it
    is the root unit's gathered parameter, so gradients through it are reduce-scattered into the
    sharded parameter like any other. Dtype is the compute dtype.
    """
    from torch.distributed.tensor import DTensor

    w = model.get_output_embeddings().weight
    if isinstance(w, DTensor):
        raise RuntimeError("student_head_weight: the lm_head weight is still sharded; call "
                           "student_hidden(model, ...) first in this step (the root FSDP unit keeps it "
                           "gathered from forward until backward)")
    return w


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2's no_sync: with ``False`` gradients accumulate locally without reduce-scatter."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def loss_scale(global_tokens: int | float | torch.Tensor) -> float:
    """Factor for a rank's summed token loss so averaged gradients equal a global token-mean."""
    n = float(global_tokens)
    if n <= 0:
        raise ValueError(f"global token count must be > 0, got {n}")
    return kdist.get_world_size() / n


# --------------------------------------------------------------------------------------------
# optimizer and schedule


def _param_groups(params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in params:
        if not p.requires_grad:
            continue
        # biases and norm gains (1-D) are not decayed: shrinking them only hurts calibration
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    extra_modules: Sequence[nn.Module] = (), extra_lr: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters (decayed: >= 2-D params; frozen ones, such
    as a LoRA student's base weights, get no optimizer state) and ``extra_modules`` at ``extra_lr``
    (default ``lr``). Fused when the parameters' device supports it, foreach otherwise.

    ``betas``/``eps``: the transformers Trainer defaults, the usual fine-tuning setting.
    """
    groups = _param_groups(model.named_parameters(), lr, weight_decay)
    for m in extra_modules:
        groups += _param_groups(m.named_parameters(), lr if extra_lr is None else extra_lr, weight_decay)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # fused kernels absent for this device/dtype
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    return opt


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps, then cosine to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _LrFactor:
    """Picklable lambda (a closure would break scheduler.state_dict round trips)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine :class:`LambdaLR` (see :func:`lr_factor`); call ``.step()`` after each
    optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _LrFactor(warmup_steps, max_steps, min_lr_ratio))


def reschedule(scheduler: torch.optim.lr_scheduler.LambdaLR, *, warmup_steps: int, max_steps: int,
               min_lr_ratio: float, lr_scale: float = 1.0) -> None:
    """Continue a restored schedule under new settings from the step it stands at.

    ``LambdaLR.load_state_dict`` brings back the saved run's warmup/max_steps/floor and base
    lrs, so a resumed run with a larger ``train.max_steps`` would otherwise stay at its floor,
    and a new ``train.lr`` would be ignored. This sets the new schedule, multiplies every
    group's base lr by ``lr_scale`` (new lr / saved lr, keeping the extra modules' ratio), and
    sets each group's current lr to what a fresh run with these settings has at this step.
    """
    for fn in scheduler.lr_lambdas:
        if not isinstance(fn, _LrFactor):
            raise TypeError(f"reschedule needs a build_scheduler schedule, got {type(fn).__name__}")
        fn.warmup_steps, fn.max_steps, fn.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
    scheduler.base_lrs = [base * lr_scale for base in scheduler.base_lrs]
    step = scheduler.last_epoch
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in groups]


def reschedule_for_recipe(scheduler, train_cfg, saved_train: dict | None) -> None:
    """:func:`reschedule` with a resumed run's ``train`` section; ``saved_train`` is the
    checkpoint's (its lr gives the scale of the base lrs; None: the lr is unchanged)."""
    saved_lr = float((saved_train or {}).get("lr", train_cfg.lr))
    reschedule(scheduler, warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps,
               min_lr_ratio=train_cfg.min_lr_ratio, lr_scale=float(train_cfg.lr) / saved_lr)


# --------------------------------------------------------------------------------------------
# extra trainable modules (aligner projectors)


def sync_extra_modules(extra_modules: Sequence[nn.Module], src: int = 0) -> None:
    """Make every rank's extra modules identical to rank ``src``'s (params and buffers)."""
    with torch.no_grad():
        kdist.broadcast_tensors([t for m in extra_modules for t in list(m.parameters()) + list(m.buffers())], src)


def _reduce_extra_grads(extra_modules: Sequence[nn.Module]) -> None:
    if kdist.get_world_size() == 1:
        return
    grads = [p.grad for m in extra_modules for p in m.parameters() if p.requires_grad]
    if any(g is None for g in grads):
        # a rank without a gradient joins with zeros so every rank runs the same collectives
        for m in extra_modules:
            for p in m.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for m in extra_modules for p in m.parameters() if p.requires_grad]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    kdist.all_reduce_mean(flat)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def clip_gradients(model: nn.Module, extra_modules: Sequence[nn.Module], max_norm: float) -> float:
    """Global L2 norm of all gradients (sharded and extra); clip to ``max_norm`` when > 0.

    Returns the pre-clip norm as a float (inf/nan when gradients are not finite).
    """
    from torch.distributed.tensor import DTensor

    model_params = [p for p in model.parameters() if p.grad is not None]
    extra_params = [p for m in extra_modules for p in m.parameters() if p.grad is not None]
    norms = []
    if model_params:
        n = torch.nn.utils.get_total_norm([p.grad for p in model_params], 2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if extra_params:
        n = torch.nn.utils.get_total_norm([p.grad for p in extra_params], 2.0)
        norms.append(n.to(norms[0].device) if norms else n)
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm > 0 and torch.isfinite(total):
        if model_params:
            torch.nn.utils.clip_grads_with_norm_(model_params, max_norm, total.to(model_params[0].grad.dtype))
        if extra_params:
            torch.nn.utils.clip_grads_with_norm_(extra_params, max_norm, total.to(extra_params[0].device))
    return float(total)


# --------------------------------------------------------------------------------------------
# the bundle the trainer drives


@dataclass
class StepStats:
    grad_norm: float  # before clipping
    lr: float  # peak-group lr used by this step
    stepped: bool  # False when gradients were not finite (parameters left untouched)


@dataclass
class Student:
    """Model + optimizer + schedule + extra modules, driven one optimizer step at a time.

    Per optimizer step: for each micro-batch ``i`` of ``n`` call :meth:`begin_micro_batch`
    (``is_last = i == n - 1``), :func:`student_hidden`/:func:`student_head_weight` through the
    loss driver, ``loss.backward()``; then :meth:`step`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    extra_modules: list[nn.Module] = field(default_factory=list)
    max_grad_norm: float = 1.0
    precision: str = "fp32"

    @classmethod
    def from_recipe(cls, recipe, extra_modules: Sequence[nn.Module] = (), extra_lr: float | None = None,
                    model: nn.Module | None = None) -> "Student":
        """Build (unless ``model`` is given), shard where :func:`uses_fsdp`, and set up
        optimization from ``recipe.train``.

        Needs :func:`kdcore.infra.distributed.init_distributed` first. Extra modules are moved to the
        training device and made identical across ranks.
        """
        t = recipe.train
        env = kdist.init_distributed()
        model = build_student(recipe) if model is None else model
        if uses_fsdp(env.world_size, t.precision):
            shard_student(model, precision=t.precision, device=env.device)
        extras = [m.to(env.device) for m in extra_modules]
        sync_extra_modules(extras)
        opt = build_optimizer(model, t.lr, t.weight_decay, extras, extra_lr)
        sched = build_scheduler(opt, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        return cls(model, opt, sched, extras, t.max_grad_norm, t.precision)

    def begin_micro_batch(self, is_last: bool) -> None:
        """Gradient accumulation: reduce-scatter only on the last micro-batch of a step."""
        set_grad_sync(self.model, is_last)

    def step(self) -> StepStats:
        """Average extra-module gradients over ranks, clip, step optimizer and schedule, zero
        gradients. Non-finite gradients skip the update (the caller decides to stop)."""
        _reduce_extra_grads(self.extra_modules)
        norm = clip_gradients(self.model, self.extra_modules, self.max_grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        set_grad_sync(self.model, True)
        return StepStats(grad_norm=norm, lr=lr, stepped=ok)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        for m in self.extra_modules:
            m.train(mode)
