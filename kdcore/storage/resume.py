"""What a resumed run may change in its recipe, and what it may not.

A resumed run continues the saved one, so it must train the same student toward the same
teacher on the same data in the same order with the same objective. Settings that change any
of that are refused on ``--resume``, naming each key with its old and new value. Settings that
only say how long, how fast or where to run are applied, and listed in one line.

May change (:data:`CHANGEABLE`): the schedule's length and shape (``train.max_steps``,
``lr``, ``warmup_steps``, ``min_lr_ratio`` — rebuilt from the resumed step by
:func:`kdcore.modeling.student.reschedule`), clipping, precision, threads and devices, evaluation
cadence, checkpointing, logging, the teacher's engine/dtype/device/threads/server (its
``remote`` address, timeouts and where the token comes from: the fingerprint check at connect
makes sure it is the same teacher) and the rollout generator's engine/server. ``distill.chunk_size`` only splits the same sum.

Everything else is refused, unknown keys included (a key not known to be harmless is assumed
to matter): student (path, tokenizer, init, num_layers, config_overrides), teacher path and
tokenizer and ``self_distill_every``, every ``distill`` algorithm, option, ratio and
temperature, every ``data`` key, ``train.seed``, ``micro_batch_size``, ``grad_accum``,
``max_tokens_per_micro_batch`` (the saved data position counts steps: another batch shape
would map the remaining steps to other samples), ``weight_decay`` (restored with the
optimizer's groups), and the rollout's sampling settings.
"""

from __future__ import annotations

from typing import Any

CHANGEABLE = (
    "train.max_steps", "train.lr", "train.warmup_steps", "train.min_lr_ratio", "train.max_grad_norm",
    "train.precision", "train.threads", "train.device", "train.eval_every", "train.eval_batches", "train.eval_at_start",
    "checkpoint.", "logging.",
    "teacher.engine", "teacher.dtype", "teacher.device", "teacher.threads", "teacher.sglang.", "teacher.remote.",
    "teacher.engine_options.", "rollout.engine_options.",  # how the engine runs, like its sglang section
    "rollout.engine", "rollout.dtype", "rollout.sglang.",
    "distill.chunk_size",
)
IGNORED = ("train.output_dir",)  # the folder being resumed; equal by construction
_UNSET = "<unset>"


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings (lists are leaves; an empty mapping adds no key, so
    ``{}`` and an absent section compare equal)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _show(value: Any) -> str:
    return value if value is _UNSET else repr(value)


def compare_recipes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(refused, changed)``: the differing keys as ``"key: old → new"``, split into those a
    resumed run may not change and those it applies."""
    a, b = flatten(saved), flatten(new)
    refused, changed = [], []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, _UNSET), b.get(key, _UNSET)
        if old == cur or _matches(key, IGNORED):
            continue
        line = f"{key}: {_show(old)} → {_show(cur)}"
        (changed if _matches(key, CHANGEABLE) else refused).append(line)
    return refused, changed


class ResumeMismatchError(ValueError):
    """``--resume`` with a recipe that changes what the saved run was training."""


def check_resume(saved: dict | None, new: dict, where: str) -> list[str]:
    """Raise :class:`ResumeMismatchError` naming the refused keys; return the applied changes.
    ``saved`` None (a run folder without a saved recipe) checks nothing."""
    if saved is None:
        return []
    refused, changed = compare_recipes(saved, new)
    if refused:
        raise ResumeMismatchError(
            f"--resume: the recipe differs from the one saved in '{where}' in keys a resumed run cannot "
            f"change: {'; '.join(refused)} (restore them, or start a fresh run with --overwrite)")
    return changed
