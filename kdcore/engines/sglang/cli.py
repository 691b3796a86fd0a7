"""``python -m kdcore.engines.sglang.cli serve RECIPE``: a node's teacher server for multi-node runs."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from kdcore.engines.sglang.config import HOOK_ENV, check_version, installed_version
from kdcore.engines.sglang.server import launch_command, server_kwargs


def serve_command(recipe: str, overrides: Sequence[str] = (), *, port: int = 30000, host: str = "127.0.0.1",
                  max_rows: int = 65536) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the per-node teacher server a recipe needs (multi-node runs)."""
    from kdcore.modeling import models
    from kdcore.recipe.loading import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    folder = models.loadable_path(cfg.teacher.path)[0]
    kw = server_kwargs(cfg.teacher.sglang, model_path=folder, dtype=cfg.teacher.dtype, max_rows=max_rows, port=port,
                       host=host, seed=cfg.train.seed, role="teacher")
    return launch_command(kw), {HOOK_ENV: "1"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m kdcore.engines.sglang.cli serve RECIPE [key=value ...] [--port N] [--print]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdcore.engines.sglang.cli")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="start this node's teacher server for a recipe (hook enabled)")
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*")
    sp.add_argument("--port", type=int, default=30000)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--max-rows", type=int, default=65536, help="tokens of the largest micro-batch, all ranks")
    sp.add_argument("--print", action="store_true", help="print the command instead of running it")
    a = ap.parse_args(argv)
    cmd, env = serve_command(a.recipe, a.overrides, port=a.port, host=a.host, max_rows=a.max_rows)
    if a.print:
        print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd))
        return 0
    check_version(installed_version())
    os.environ.update(env)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

