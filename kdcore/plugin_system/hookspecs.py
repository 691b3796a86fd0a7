"""Every extension point of kdflow. These docstrings are the plugin-author documentation.

A plugin is any module (usually exposed through the ``kdcore`` entry-point group of an
installed distribution) that defines functions decorated with :data:`kdcore.hookimpl` whose
names match the hooks below. Each hook receives a single ``register`` callback; call it once per
algorithm the plugin provides. The core validates every item as it arrives and fails at startup
on a bad item or a hookimpl whose name matches no hook here. A name registered twice does not
stop the start: the registry loads, ``kdcore plugins`` lists both providers, and the name is
refused (naming both) wherever a recipe or command uses it.

The common shape of ``register`` for every hook::

    register(name, fn, options=None, summary=None)

``name``
    Registry name, lowercase ``[a-z][a-z0-9_]*``. Unique per kind across all installed plugins:
    when two plugins register one name, using it is an error naming both (the others still work).
``fn``
    The callable (contract per hook below); for ``register_engines``, an engine spec object.
``options``
    ``None`` or a dataclass type whose fields (each with a default) are the algorithm's options.
    Recipes set them under ``distill.<kind>_options`` and ``kdcore validate`` checks them
    against this dataclass (unknown keys, types). ``fn`` receives the values as keyword
    arguments (losses) or as an instance (aligners, rollouts, evaluators; evaluators' options
    are set under ``eval.options.<name>``).
``summary``
    One line for ``kdcore list-algorithms``. Defaults to the first line of ``fn``'s docstring,
    or ``"Undocumented"``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")


@hookspec
def register_losses(register):
    """Register per-token divergences between a teacher and a student distribution.

    ``fn(student_logits, teacher_logits, *, temperature, **options) -> Tensor[n]``

    - ``student_logits``: ``Tensor[n, V]`` (any float dtype; may require grad).
    - ``teacher_logits``: ``Tensor[n, V]`` (no grad). Entries may be ``-inf`` (masked vocab rows).
    - ``temperature``: float > 0. Use ``p = softmax(teacher_logits / T)`` (teacher) and
      ``q = softmax(student_logits / T)`` (student); do **not** multiply by ``T**2``.
    - ``options``: the fields of the registered options dataclass, as keyword arguments.
    - Returns the divergence per token, shape ``[n]``, computed in float32 whatever the input
      dtype, finite for finite or ``-inf`` inputs.

    The core does the rest: chunking over tokens (``fn`` sees one chunk at a time, so it must
    be row-independent), masking, reduction to a token mean, mixing with cross-entropy, and
    temperature bookkeeping.
    """


@hookspec
def register_aligners(register):
    """Register aligners: how student positions learn from teacher positions.

    ``fn(*, student_tokenizer, teacher_tokenizer, options, cache_dir) -> kdcore.distill.aligner.Aligner``

    Called once per (student tokenizer, teacher tokenizer) pair; ``options`` is an instance of
    the registered options dataclass (or ``None``), ``cache_dir`` a folder for vocabulary maps
    that should survive between runs (key files by the tokenizers' content hash). The returned
    object is a ``torch.nn.Module`` implementing :class:`kdcore.distill.aligner.Aligner`:

    - ``align(student, teacher) -> Alignment``: per sample, from the two tokenizations'
      character offsets, which teacher positions the engine must return hidden states for and
      how they pair with the student's loss positions.
    - ``forward(batch: AlignedBatch, loss) -> LossOutput``: the KD and CE sums for a
      micro-batch, given student hidden states with grad, the student head, teacher hidden
      states at the requested positions and the teacher head.

    Parameters of the module (e.g. DSKD projectors) are trained: the core adds them to the
    optimizer, keeps them identical across ranks and saves them in checkpoints.
    """


@hookspec
def register_rollouts(register):
    """Register rollout policies: which sequences the student learns on at each step.

    ``fn(options) -> kdcore.training.rollout_policy.RolloutPolicy``

    ``options`` is an instance of the registered options dataclass (or ``None``). The policy's
    ``select(batch, ctx) -> batch`` receives the data set's micro-batch and a
    :class:`kdcore.training.rollout_policy.RolloutContext` that can sample from the live student and from the
    teacher, holds a replay buffer, a seeded RNG, the step number and the last evaluation loss.
    Sampled token ids must be used as they are (never re-tokenized from text).
    """


@hookspec
def register_engines(register):
    """Register engines: what computes the teacher's hidden states and what samples rollouts.

    ``register(name, spec, options=None)`` where ``spec`` is an instance of a
    :class:`kdcore.engines.EngineSpec` subclass and ``options`` an optional dataclass (defaults
    for every field): the engine's section ``teacher.engine_options`` / ``rollout.engine_options``,
    checked like ``distill.loss_options`` and handed to ``create_*`` as ``options=``. Recipes pick
    engines by name: ``teacher.engine: <name>`` and ``rollout.engine: <name>``; ``kdcore
    validate`` checks the name against the installed engines (with a did-you-mean). The spec provides:

    - ``roles``: a tuple of ``"teacher"`` and/or ``"rollout"``, the sections it can serve.
    - ``create_teacher(teacher_cfg, *, max_rows, threads, micro_batches_per_step, **kwargs)``
      for ``"teacher"``: build (not start) a :class:`kdcore.engines.protocol.TeacherEngine` from
      the recipe's ``teacher`` section. ``max_rows``: rows of one channel slot; ``threads``: CPU
      threads (None = the engine's default); ``micro_batches_per_step``: ``train.grad_accum``.
      The engine decides its own slot count (``n_slots``, at least 2 for pipelining) and sets
      ``colocated = True`` when it shares the accelerators with the student and must only be
      awake for teacher phases (it then needs ``max(2, micro_batches_per_step)`` slots).
    - ``create_rollout(*, config, device, dtype, threads, settings, **kwargs)`` for
      ``"rollout"``: a :class:`kdcore.engines.protocol.RolloutEngine` sampling from a copy of
      the student (its transformers ``config``); ``settings`` is the ``rollout`` section. Use
      :func:`kdcore.engines.protocol.check_generate` and ``finish_generations`` so every engine
      refuses the same inputs with the same words.
    - ``check_recipe(section, prefix) -> list[str]`` (optional): one-line problems with the raw
      ``teacher`` or ``rollout`` section (``prefix``) naming this engine, run at validation.

    An engine receives **token ids, never text**, and never knows the loss or the aligner: a
    teacher engine returns last hidden states (after the final norm, before ``lm_head``) at
    the requested positions, plus ``lm_head()``; the core does the rest. Registration runs
    for every ``kdcore`` command, so the spec's module must import nothing heavy (torch,
    CUDA-only backends): import the engine inside ``create_*``, and raise a one-line
    :class:`kdcore.engines.TeacherError` / ``RolloutError`` naming what is missing when the
    engine cannot run here.
    """


@hookspec
def register_evaluators(register):
    """Register generation evaluators: scores of the student's greedy answers, for ``kdcore eval``.

    ``fn(generations: kdcore.commands.evaluate.Generations, options) -> dict[str, float]``

    ``kdcore eval`` asks the student and the teacher for greedy answers to the held-out
    prompts (``eval.max_new_tokens`` new tokens at most, each side with its own tokenizer and
    chat template) and calls every evaluator the recipe lists under ``eval.evaluators`` once
    with all of them. ``generations`` holds, one entry per prompt, in the same order:

    - ``prompts``: the prompt's text (message contents, without any chat template).
    - ``references``: the data set's answer to it (the final trained assistant turn, or the
      ``completion``).
    - ``student`` / ``teacher``: each model's decoded answer (special tokens dropped), and
      ``student_ids`` / ``teacher_ids``: the generated token ids exactly as sampled (the stop
      token included when the answer ended on one).
    - ``student_tokenizer`` / ``teacher_tokenizer``: the two tokenizers (the same object when
      the pair shares one).
    - ``student_prompt_ids`` / ``teacher_prompt_ids``: the ids each side was asked to continue
      (its chat template and generation prompt included).
    - ``student_model``: the student (a transformers causal LM in eval mode, on its device), for
      evaluators that score it on other text, e.g. on the teacher's answers (``draft``). Read
      it only: no training, no change of mode.

    ``options`` is an instance of the registered options dataclass (or ``None``). Return a
    mapping of metric names (``[a-z][a-z0-9_]*``) to finite floats; the core reports each as
    ``<evaluator name>_<metric>`` (e.g. ``rouge_l_vs_reference``), so names need only be unique
    within one evaluator. Evaluators must not modify ``generations`` (they all share it) and
    run after the answers are generated, so they may take their time. Return ``{}`` when the
    metric does not apply (e.g. a same-tokenizer metric on a cross-tokenizer pair): the report
    then has no such keys.
    """


@hookspec
def register_loggers(register):
    """Register loggers: experiment trackers that receive every record a run writes.

    ``register(name, factory)`` (no ``options``: a logger reads what it needs from the config).
    Recipes turn loggers on with ``logging.backends: [<name>, ...]``; ``kdcore validate``
    checks each name against the installed loggers (with a did-you-mean). ``metrics.jsonl`` is
    not a plugin: the run writes it itself, always and before every logger; its name ``jsonl``
    is reserved (a recipe may list it, to no effect; a plugin may not register it).

    ``factory(*, run_dir: Path, config: dict) -> Logger``

    - ``run_dir``: the run's output folder (``train.output_dir``); write under it, e.g.
      ``<run_dir>/<name>/``. It exists when the factory is called.
    - ``config``: the resolved recipe as a plain dict (``OmegaConf.to_container(cfg,
      resolve=True)``); log it once if the tracker keeps run metadata.

    The returned object implements :class:`kdcore.training.metrics.Logger`:

    - ``log(record: dict)`` for every step record and every evaluation record, in order: the
      same dicts as the lines of ``metrics.jsonl``. Every record has an int ``step``; step
      records have ``loss``, ``kd_loss``, ``lr``, ...; evaluation records have ``eval_*`` keys
      (a step can have both). Values are numbers (plus whatever a plugin's metrics add).
    - ``close()`` once at the end of the run, also when the run fails.

    Loggers are built and called on the main rank only. A logger that raises (in the factory,
    ``log`` or ``close``) is named in one warning line and disabled; the run goes on with the
    others. Registration runs for every ``kdcore`` command: import the tracker's package inside
    the factory, not at module level.
    """
