"""The ``remote`` engine's recipe section (``teacher.remote``) and its checks (light: no torch, no zmq).

Imported by the recipe schema (:mod:`kdcore.schema`, one-way, as the sglang section is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass
class RemoteTeacherConfig:
    """teacher.engine 'remote': where the `kdcore serve-teacher` runs and how long to wait for it."""

    address: Optional[str] = None  # HOST:PORT; required with engine remote (no sensible default host)
    # the server's shared secret, one of: token_file (a file holding it), token_env (a variable's
    # name), token (the value; masked in every file a run writes). None of them: $KDFLOW_TEACHER_TOKEN.
    token: Optional[str] = None  # None: from token_file/token_env/$KDFLOW_TEACHER_TOKEN, never stored
    token_env: Optional[str] = None  # None: KDFLOW_TEACHER_TOKEN, read if set
    token_file: Optional[str] = None  # None: no file; a path is read at start (kdcore/secret.py)
    timeout_s: float = 20.0  # silence before the server counts as lost: inside the 30 s stop budget
    retries: int = 0  # reconnects (with resends) after a loss; 0: a dead server stops the run at once


def check_recipe_section(section: Mapping[str, Any], prefix: str) -> list[str]:
    """Problems with a teacher section whose engine is remote, one line each."""
    remote = section.get("remote") or {}
    if not isinstance(remote, Mapping):
        return []  # the schema check reports the type
    errors = []
    address = remote.get("address")
    host, sep, port = str(address or "").removeprefix("tcp://").rpartition(":")
    if not address:
        errors.append(f"{prefix}.remote.address: required with {prefix}.engine 'remote' (HOST:PORT of a "
                      f"`kdcore serve-teacher`)")
    elif not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        errors.append(f"{prefix}.remote.address: '{address}' must look like HOST:PORT (e.g. 10.0.0.5:5555)")
    timeout, retries = remote.get("timeout_s", 1.0), remote.get("retries", 0)
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout <= 0:
        errors.append(f"{prefix}.remote.timeout_s: must be > 0, got {timeout!r}")
    if isinstance(retries, int) and not isinstance(retries, bool) and retries < 0:
        errors.append(f"{prefix}.remote.retries: must be >= 0, got {retries!r}")
    if (section.get("self_distill_every") or 0) > 0:
        errors.append(f"{prefix}.self_distill_every: a remote teacher cannot take the student's weights "
                      f"(use engine hf or sglang for self-distillation)")
    return errors
