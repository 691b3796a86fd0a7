"""The ``remote`` engine's recipe section (``teacher.remote``) and its checks (light: no torch, no zmq).

Imported by the recipe schema (:mod:`kdcore.recipe.schema`, one-way, as the sglang section is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kdcore.engines.protocol import TeacherError


@dataclass
class RemoteTeacherConfig:
    """teacher.engine 'remote': where the `kdcore serve-teacher` runs and how long to wait for it."""

    # HOST:PORT, or several comma-separated (replicas of one teacher: a pool, kdcore/engines/remote/pool.py)
    address: Optional[str] = None  # HOST:PORT[,HOST:PORT...]; required with engine remote (no sensible default host)
    # the server's shared secret, one of: token_file (a file holding it), token_env (a variable's
    # name), token (the value; masked in every file a run writes). None of them: $KDFLOW_TEACHER_TOKEN.
    token: Optional[str] = None  # None: from token_file/token_env/$KDFLOW_TEACHER_TOKEN, never stored
    token_env: Optional[str] = None  # None: KDFLOW_TEACHER_TOKEN, read if set
    token_file: Optional[str] = None  # None: no file; a path is read at start (kdcore/recipe/secret.py)
    timeout_s: float = 20.0  # silence before the server counts as lost: inside the 30 s stop budget
    retries: int = 0  # reconnects (with resends) after a loss; 0: a dead server stops the run at once


def check_recipe_section(section: Mapping[str, Any], prefix: str) -> list[str]:
    """Problems with a teacher section whose engine is remote, one line each."""
    remote = section.get("remote") or {}
    if not isinstance(remote, Mapping):
        return []  # the schema check reports the type
    errors = []
    try:  # one HOST:PORT, or several comma-separated (a pool of replicas), each checked
        parse_addresses(remote.get("address"), key=f"{prefix}.remote.address")
    except TeacherError as exc:
        errors.append(str(exc))
    timeout, retries = remote.get("timeout_s", 1.0), remote.get("retries", 0)
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout <= 0:
        errors.append(f"{prefix}.remote.timeout_s: must be > 0, got {timeout!r}")
    if isinstance(retries, int) and not isinstance(retries, bool) and retries < 0:
        errors.append(f"{prefix}.remote.retries: must be >= 0, got {retries!r}")
    if (section.get("self_distill_every") or 0) > 0:
        errors.append(f"{prefix}.self_distill_every: a remote teacher cannot take the student's weights "
                      f"(use engine hf or sglang for self-distillation)")
    return errors


def parse_addresses(text: Any, key: str = "teacher.remote.address") -> list[str]:
    """``tcp://HOST:PORT`` for each comma-separated entry of ``text``; one-line error naming the
    entry that is not HOST:PORT, or one given twice."""
    entries = [e.strip() for e in str(text or "").split(",")]
    if not any(entries):
        raise TeacherError(f"{key}: required with engine 'remote' (HOST:PORT of a `kdcore serve-teacher`, "
                           f"or several, comma-separated)")
    out = []
    for entry in entries:
        host, sep, port = entry.removeprefix("tcp://").rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or any(c in host for c in " /"):
            raise TeacherError(f"{key}: '{entry}' must look like HOST:PORT (e.g. 10.0.0.5:5555; several "
                               f"comma-separated)")
        ep = f"tcp://{host}:{int(port)}"
        if ep in out:
            raise TeacherError(f"{key}: '{entry}' is given twice")
        out.append(ep)
    return out
