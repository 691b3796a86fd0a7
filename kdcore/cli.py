"""The ``kdcore`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from kdcore.registry import KINDS

EXAMPLES = """\
examples:
  kdcore train quickstart                     run a shipped recipe by name
  kdcore train recipes/quickstart.yaml train.lr=3e-4 train.max_steps=50
  torchrun --nproc_per_node 2 -m kdcore train quickstart
  kdcore train quickstart --resume            continue from the latest checkpoint
  kdcore cache-teacher quickstart --out cache/qs   store the teacher's states once
  kdcore train quickstart teacher.engine=cache teacher.cache=cache/qs
  kdcore validate recipes/my.yaml distill.loss=js distill.loss_options.beta=0.3
  kdcore list-algorithms --kind loss
  kdcore list-algorithms --json
  kdcore plugins
"""


def _console():
    from rich.console import Console

    return Console()


def _registry_or_exit():
    from kdcore.plugins import load_registry
    from kdcore.registry import PluginError

    try:
        registry = load_registry()
    except PluginError as exc:
        print(f"kdcore: plugin error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    for p in registry.failed_plugins():
        print(f"kdcore: warning: plugin '{p.name}' ({p.distribution} {p.version}) failed to load: {p.error}",
              file=sys.stderr)
    return registry


def _options_text(entry) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in entry.option_fields().items())


def cmd_list_algorithms(args) -> int:
    registry = _registry_or_exit()
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
    registry = _registry_or_exit()
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
    from kdcore.config import RecipeError, load_raw, validate_raw

    registry = _registry_or_exit()
    try:
        path, raw = load_raw(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 2
    errors = validate_raw(raw, registry)
    if errors:
        print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0


def cmd_train(args) -> int:
    from kdcore.config import RecipeError, load_recipe

    registry = _registry_or_exit()
    try:
        cfg = load_recipe(args.recipe, args.overrides, registry=registry)
    except RecipeError as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 2
    from kdcore.training import TrainingError, train

    try:
        train(cfg, registry=registry, resume=args.resume)
    except TrainingError as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 1
    from kdcore import distributed as kdist

    kdist.teardown()  # only after success: on an error the peers may never reach its barrier
    return 0


def cmd_cache_teacher(args) -> int:
    from kdcore.config import RecipeError, load_raw, load_recipe
    from kdcore.engines.cache_build import build_teacher_cache, live_engine_overrides

    registry = _registry_or_exit()
    try:
        overrides = list(args.overrides) + live_engine_overrides(args.recipe, args.overrides, registry, args.engine)
        _, raw = load_raw(args.recipe, overrides)
        cfg = load_recipe(args.recipe, overrides, registry=registry)
    except RecipeError as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 2
    from kdcore.engines.cache_build import BUILD_ERRORS

    try:
        done = build_teacher_cache(cfg, raw, args.out, registry=registry, dtype=args.dtype, shard_mb=args.shard_mb,
                                   batch_size=args.batch_size, progress=cfg.logging.progress)
    except BUILD_ERRORS as exc:
        print(f"kdcore: {exc}", file=sys.stderr)
        return 1
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
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("list-algorithms", help="installed losses, aligners and rollouts")
    p.add_argument("--kind", choices=list(KINDS))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list_algorithms)

    p = sub.add_parser("plugins", help="installed plugins, versions and hooks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kdcore.runtime import passive_threads_default

    passive_threads_default()  # before anything imports torch (see kdcore.runtime)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
