"""The ``kdcore`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdcore.plugin_system.registry import KINDS

EXAMPLES = """\
examples:
  kdcore train quickstart                     run a shipped recipe by name
  kdcore train recipes/quickstart.yaml train.lr=3e-4 train.max_steps=50
  torchrun --nproc_per_node 2 -m kdcore train quickstart
  kdcore train quickstart --resume            continue from the latest checkpoint
  kdcore eval outputs/run                     score a run's student against its teacher
  kdcore eval quickstart --student outputs/quickstart/hf --json eval.json
  kdcore eval outputs/quickstart --against outputs/quickstart_ce   beside the CE-only twin
  kdcore train quickstart --overwrite         start over; the old run is moved to <dir>.old-<time>
  kdcore cache-teacher quickstart --out cache/qs   store the teacher's states once
  kdcore train quickstart teacher.engine=cache teacher.cache=cache/qs
  kdcore validate recipes/my.yaml distill.loss=js distill.loss_options.beta=0.3
  kdcore config quickstart train.lr=3e-4       the recipe with every default filled in
  kdcore list-algorithms --kind loss
  kdcore list-algorithms --json
  kdcore plugins
  kdcore plot outputs/kd outputs/ce --labels KD,CE -o compare.png   (default: outputs/kd/metrics.png)
  kdcore serve-teacher quickstart --listen 0.0.0.0:5555 --token $SECRET   teacher for remote students
"""


def _console():
    from rich.console import Console

    return Console()


# what the top-level error handler needs to know about the command that failed
_CONTEXT: dict = {"output_dir": None}


def _registry_with_warnings():
    from kdcore.plugin_system.manager import load_registry

    registry = load_registry()  # a PluginError goes to the top-level handler: one line, exit 2
    for p in registry.failed_plugins():
        print(f"kdcore: warning: plugin '{p.name}' ({p.distribution} {p.version}) failed to load: {p.error}",
              file=sys.stderr)
    for kind, name in sorted(registry.duplicates):
        print(f"kdcore: warning: {registry.duplicate_text(kind, name)} (commands that use it refuse)",
              file=sys.stderr)
    return registry


def _options_text(entry) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in entry.option_fields().items())


def cmd_list_algorithms(args) -> int:
    registry = _registry_with_warnings()
    entries = registry.list(args.kind)
    if args.json:
        print(json.dumps([
            {"name": e.name, "kind": e.kind, "plugin": e.plugin, "version": e.version,
             "summary": e.summary, "options": e.option_fields()}
            for e in entries
        ], indent=2, default=str))
        return 0
    from rich.table import Table

    console = _console()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        table = Table(title=f"{kind}es" if kind == "loss" else f"{kind}s", title_justify="left")
        for col in ("name", "plugin", "summary", "options"):
            table.add_column(col, overflow="fold")
        for e in (e for e in entries if e.kind == kind):
            table.add_row(e.name, f"{e.plugin} {e.version}", e.summary, _options_text(e) or "-")
        console.print(table)
    return 0


def cmd_plugins(args) -> int:
    registry = _registry_with_warnings()
    counts: dict[str, int] = {}
    for e in registry.list():
        counts[e.plugin] = counts.get(e.plugin, 0) + 1
    rows = [
        {"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
         "hooks": list(p.hooks), "error": p.error}
        for p in registry.plugins
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "distribution", "version", "hooks", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = f"[red]failed: {r['error']}[/red]" if r["error"] else ("built-in" if r["builtin"] else "ok")
        table.add_row(r["name"], r["distribution"], r["version"], ", ".join(r["hooks"]) or "-", status)
    _console().print(table)
    return 0


def cmd_validate(args) -> int:
    from kdcore.recipe.loading import blame_overrides, load_raw, recipe_warnings, validate_raw

    registry = _registry_with_warnings()
    path, raw = load_raw(args.recipe, args.overrides)
    errors = validate_raw(raw, registry, recipe_dir=path.parent)
    for w in recipe_warnings(raw):
        print(f"kdcore: warning: {w}", file=sys.stderr)
    if errors:
        from kdcore.recipe.loading import ERROR_CHARS
        from kdcore.infra.exceptions import clip

        source, errors = blame_overrides(str(path), errors, args.overrides, raw.get("setup"))
        print(f"{source}: {len(errors)} error(s)", file=sys.stderr)
        for e in errors:
            print(f"  - {clip(e, ERROR_CHARS)}", file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0


def cmd_config(args) -> int:
    """The recipe as a run would see it: overrides applied, every default filled in, checked."""
    from kdcore.recipe.loading import load_recipe
    from kdcore.recipe.doc import resolved_yaml

    cfg = load_recipe(args.recipe, args.overrides, registry=_registry_with_warnings())
    sys.stdout.write(resolved_yaml(cfg))
    return 0


def cmd_train(args) -> int:
    from kdcore.recipe.loading import load_recipe
    from kdcore.storage.run_folder import RunFolderError

    if args.resume and args.overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    if args.allow_data_change and not args.resume:
        raise RunFolderError("--allow-data-change only applies with --resume")
    registry = _registry_with_warnings()
    cfg = load_recipe(args.recipe, args.overrides, registry=registry)
    _CONTEXT["output_dir"] = cfg.train.output_dir
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import recipe_warnings

    for w in recipe_warnings(OmegaConf.to_container(cfg, resolve=True)):
        print(f"kdcore: warning: {w}", file=sys.stderr)
    from kdcore.training import train

    train(cfg, registry=registry, resume=args.resume, overwrite=args.overwrite,
          allow_data_change=args.allow_data_change)
    from kdcore.infra import distributed as kdist

    kdist.teardown()  # only after success: on an error the peers may never reach its barrier
    return 0


def cmd_plot(args) -> int:
    from kdcore.commands.plot import PlotError, load_runs, plot_runs

    labels = args.labels.split(",") if args.labels is not None else None
    if labels is not None and not all(x.strip() for x in labels):
        raise PlotError(f"--labels: an empty label in '{args.labels}'")
    # default: beside the first run's metrics, not into whatever folder the shell is in
    out = args.out if args.out is not None else Path(args.runs[0]) / "metrics.png"
    print(f"wrote {plot_runs(load_runs(args.runs, labels), out)}")
    return 0


def cmd_eval(args) -> int:
    from kdcore.recipe.loading import load_recipe
    from kdcore.commands.evaluate import evaluate, print_report, resolve_target, write_report

    registry = _registry_with_warnings()
    overrides = list(args.overrides)
    if args.max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.samples is not None:
        overrides.append(f"eval.samples={args.samples}")
    # bad input and failures are reported by main's handler, one line each (kdcore/commands/errors.py)
    target = resolve_target(args.recipe_or_run, student=args.student, json_out=args.json, overrides=overrides)
    cfg = load_recipe(target.recipe, overrides, registry=registry)
    from kdcore.commands.evaluate import EvalInputError
    from kdcore.commands.run_summary import print_summary, run_folder_of, summary

    against = Path(args.against) if args.against else None
    if against is not None and not (against / "metrics.jsonl").is_file():
        raise EvalInputError(f"--against {against}: no metrics.jsonl there (give another run's train.output_dir)")
    report = evaluate(cfg, target.student, registry=registry, say=_console().print)
    run_dir = run_folder_of(Path(target.student))
    before_after = summary(run_dir, against) if run_dir is not None else None
    if before_after is not None:
        report["training"] = before_after  # in the JSON too: step 0 -> last evaluation
    write_report(report, target.json_path)
    print_report(report, _console())
    if before_after is not None:
        print_summary(before_after, _console())
    _console().print(f"wrote {target.json_path}")
    return 0


def cmd_serve_teacher(args) -> int:
    from kdcore.engines.remote.server import serve_recipe

    return serve_recipe(args.recipe, args.overrides, listen=args.listen, token=args.token, max_rows=args.max_rows,
                        max_request_mb=args.max_request_mb, max_tokens=args.max_tokens,
                        progress_timeout=args.progress_timeout, stats_every_s=args.stats_every)


def _add_serve_teacher(sub) -> None:
    p = sub.add_parser("serve-teacher", help="serve a recipe's teacher hidden states to remote trainers")
    p.add_argument("recipe", help="recipe whose teacher section is served")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. teacher.device=cuda")
    p.add_argument("--listen", default="127.0.0.1:5555",
                   help="HOST:PORT to bind (default 127.0.0.1:5555; port 0 = any free one)")
    p.add_argument("--token", default=None,
                   help="shared secret every request must carry (default: $KDFLOW_TEACHER_TOKEN); "
                        "required beyond localhost")
    p.add_argument("--max-rows", type=int, default=None,
                   help="most hidden-state rows a request may ask for (default: from the recipe's batch size)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="larger requests are refused (default 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens (batch x length) one request may carry; larger ones are refused with a reply "
                        "(default: twice --max-rows, so one request cannot hold the engine for long)")
    p.add_argument("--progress-timeout", type=float, default=None,
                   help="seconds without engine progress before a request counts as hung: it fails with a reply "
                        "and the engine is restarted (default: the engine's, 20 s for hf)")
    p.add_argument("--stats-every", type=float, default=60.0, help="seconds between per-client rows/s lines")
    p.set_defaults(func=cmd_serve_teacher)




def cmd_cache_teacher(args) -> int:
    from kdcore.recipe.loading import RecipeError, load_raw, load_recipe
    from kdcore.commands.cache_teacher import build_teacher_cache, live_engine_overrides

    registry = _registry_with_warnings()
    try:
        overrides = list(args.overrides) + live_engine_overrides(args.recipe, args.overrides, registry, args.engine)
        _, raw = load_raw(args.recipe, overrides)
        cfg = load_recipe(args.recipe, overrides, registry=registry)
    except RecipeError as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 2
    from kdcore.commands.cache_teacher import BUILD_ERRORS

    try:
        done = build_teacher_cache(cfg, raw, args.out, registry=registry, dtype=args.dtype, shard_mb=args.shard_mb,
                                   batch_size=args.batch_size, progress=cfg.logging.progress)
    except BUILD_ERRORS as exc:
        from kdcore.commands.errors import EXIT_FAILED, classify, one_line

        print(f"kdcore: {one_line(exc)}", file=sys.stderr)
        return classify(exc) or EXIT_FAILED  # bad data or a missing model: 2, as documented
    print(f"{done.folder}: verified; {done.samples} samples, {done.rows} teacher rows (tokens), "
          f"{done.bytes / 2**20:.1f} MiB in {done.shards} shard(s) ({done.built_shards} built now), "
          f"{done.bytes_per_row:.0f} bytes per token, {done.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcore",
        description="kdflow: distill a large language model into a smaller one.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run a recipe", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a train.output_dir that holds a run: the old run is moved to "
                        "<dir>.old-<timestamp> (never deleted)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although a data file changed since the run started "
                        "(refused otherwise: the saved position would read other samples)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a trained student against its teacher on the held-out data")
    p.add_argument("recipe_or_run", help="a run folder (with recipe.yaml and hf/), or a recipe file or name")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. eval.evaluators=[rouge_l]")
    p.add_argument("--student", help="the student's Hugging Face folder (default: the run's hf/)")
    p.add_argument("--json", help="where the JSON report goes (default: eval.json beside the student folder)")
    p.add_argument("--max-new-tokens", type=int, help="greedy answer length (default: eval.max_new_tokens)")
    p.add_argument("--samples", type=int, help="side-by-side answers to print (default: eval.samples)")
    p.add_argument("--against", metavar="OTHER_RUN", help="another run folder (e.g. the CE-only twin) whose last "
                   "held-out figures are shown beside this run's step 0 -> last")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("cache-teacher", help="store a recipe's teacher hidden states once (teacher.engine: cache)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, help="the cache folder (an interrupted build there is continued)")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype: bfloat16 (default, 2*H bytes/token), "
                   "float32 (exact), float16")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MiB")
    p.add_argument("--batch-size", type=int, default=None, help="samples per teacher request (train.micro_batch_size)")
    p.add_argument("--engine", default=None, help="live teacher engine to build with (default: the recipe's; "
                   "hf when the recipe names the cache)")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("validate", help="check a recipe and report every error at once")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="print a recipe resolved with every default (reference: docs/recipes.md)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("list-algorithms", help="installed algorithms, engines and evaluators, by kind")
    p.add_argument("--kind", choices=list(KINDS))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list_algorithms)

    p = sub.add_parser("plugins", help="installed plugins, versions and hooks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("plot", help="loss, teacher KL and perplexity of runs, overlaid, as a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.output_dir folders (each has metrics.jsonl)")
    p.add_argument("-o", "--out", default=None, help="the PNG to write (default: metrics.png in the first RUN_DIR)")
    p.add_argument("--labels", help="comma-separated legend names, one per run (default: the folder names)")
    p.set_defaults(func=cmd_plot)
    _add_serve_teacher(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but flags may sit anywhere among the overrides (``train quickstart
    --resume train.max_steps=10``): argparse ends a ``nargs="*"`` positional at the first flag and
    calls what follows unrecognized, so those ``key=value`` words are put back with the others."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    from kdcore.infra.process_env import passive_threads_default

    passive_threads_default()  # before anything imports torch (see kdcore.infra.process_env)
    args = parse_args(argv)
    from kdcore.commands.errors import watch_sigint

    watch_sigint()
    _CONTEXT["output_dir"] = None
    try:
        return args.func(args)
    except SystemExit:
        raise
    except BaseException as exc:  # KeyboardInterrupt and library BaseExceptions (DCP's) too
        from kdcore.commands.errors import report

        return report(exc, output_dir=_CONTEXT["output_dir"])


if __name__ == "__main__":
    raise SystemExit(main())
