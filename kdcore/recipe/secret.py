"""Secrets in recipes: the remote teacher's token never reaches a file kdcore writes.

``teacher.remote`` (and each ``teachers[i].remote``) gives the server's shared secret one way,
the first set of:

- ``token_file``: a file holding it (``~`` expanded, trailing newline dropped), e.g. a mounted
  secret; read when the engine starts.
- ``token_env``: the name of an environment variable holding it; that variable must be set.
- ``token``: the secret itself (e.g. the override ``teacher.remote.token=...``). Accepted, but
  the moment the recipe is loaded (:func:`hold_secrets`) the value is replaced by :data:`MASK`
  in the recipe and kept in this process's memory only, keyed by the section's address; so the
  saved ``recipe.yaml``, every checkpoint's ``recipe.json`` and the trackers' configs hold the
  mask. Every writer of a recipe masks again (:func:`mask_secrets`) for a recipe built in code.
- none of them: ``$KDFLOW_TEACHER_TOKEN`` (unset: no token, enough for a server on 127.0.0.1).

A saved recipe read back (``kdcore eval RUN``, a resumed run's comparison) holds the mask: the
token is then read again from ``token_file``/``token_env``/``$KDFLOW_TEACHER_TOKEN``, or from the
override given again with ``--resume`` (both sides of the resume check hold the mask, so they
compare equal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

MASK = "<hidden: not saved>"  # what a recipe file holds where a token was given
DEFAULT_ENV = "KDFLOW_TEACHER_TOKEN"
TOKEN_KEYS = ("token", "token_env", "token_file")

_held: dict[Optional[str], str] = {}  # remote address -> the literal token this process was given


def _remote_sections(raw: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``(where, remote section)`` of every teacher of a raw recipe mapping."""
    out = []
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("remote"), dict):
        out.append(("teacher.remote", teacher["remote"]))
    for i, entry in enumerate(raw.get("teachers") if isinstance(raw.get("teachers"), list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("remote"), dict):
            out.append((f"teachers[{i}].remote", entry["remote"]))
    return out


def hold_secrets(raw: dict) -> None:
    """Move each literal ``remote.token`` of ``raw`` (in place) into this process's memory,
    leaving :data:`MASK` in the recipe."""
    for _, remote in _remote_sections(raw):
        token = remote.get("token")
        if isinstance(token, str) and token and token != MASK:
            _held[remote.get("address")] = token
            remote["token"] = MASK


def mask_secrets(recipe: dict) -> dict:
    """``recipe`` (a plain dict, changed in place and returned) with every literal token masked."""
    if isinstance(recipe, dict):
        for _, remote in _remote_sections(recipe):
            if remote.get("token") not in (None, ""):
                remote["token"] = MASK
    return recipe


def check_secrets(raw: Mapping[str, Any], errors: list[str]) -> None:
    """One token source per section; a ``token_file`` that exists and can be read (its content
    is never echoed)."""
    for where, remote in _remote_sections(raw):
        given = [k for k in TOKEN_KEYS if remote.get(k) not in (None, "")]
        if len(given) > 1:
            errors.append(f"{where}: give one of {', '.join(f'{where}.{k}' for k in given)}, not several")
        file = remote.get("token_file")
        if isinstance(file, str) and file:
            p = Path(file).expanduser()
            if not p.is_file():
                errors.append(f"{where}.token_file: no such file '{file}'")
            elif not os.access(p, os.R_OK):
                errors.append(f"{where}.token_file: '{file}' is not readable (permission denied)")


def remote_token(remote: Any) -> Optional[str]:
    """The token a ``remote`` section (a DictConfig, dataclass or mapping) stands for; None when
    none is set anywhere. Raises :class:`kdcore.engines.protocol.TeacherError` in one line for a
    named variable that is unset or a file that cannot be read."""
    from kdcore.engines.protocol import TeacherError

    def get(key: str) -> Any:
        return remote.get(key) if isinstance(remote, Mapping) else getattr(remote, key, None)

    token = get("token")
    if token == MASK:
        held = _held.get(get("address"))
        if held is not None:
            return held
    elif token:
        return str(token)
    file = get("token_file")
    if file:
        try:
            value = Path(str(file)).expanduser().read_text().strip("\r\n")
        except OSError as exc:
            raise TeacherError(f"teacher.remote.token_file: cannot read '{file}': {exc.strerror or exc}") from None
        if not value:
            raise TeacherError(f"teacher.remote.token_file: '{file}' is empty")
        return value
    env = get("token_env")
    if env:
        value = os.environ.get(str(env))
        if not value:
            raise TeacherError(f"teacher.remote.token_env: the environment variable {env} is not set")
        return value
    return os.environ.get(DEFAULT_ENV) or None
