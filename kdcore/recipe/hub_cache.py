"""Hub model ids when the hub cannot be reached (issue 28: ``validate`` said ok for a hub id,
then training failed after ~52 s of retries). With ``HF_HUB_OFFLINE`` set, a hub id is only
usable if its files are in the local Hugging Face cache, so ``kdcore validate`` checks that
there; online, reaching the hub is the loader's job and is not tried at validation."""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}  # how huggingface_hub reads its boolean variables


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def offline_hub_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot load offline (its config.json is not in the local cache), or None
    (found, or online: not checked here)."""
    if not hub_offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception as exc:  # a malformed id: huggingface_hub validates it
        return f"hub id '{repo_id}': {' '.join(str(exc).split())}"
    if isinstance(found, str):
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"hub id '{repo_id}' is not in the local Hugging Face cache ({HF_HUB_CACHE}) and HF_HUB_OFFLINE "
            f"is set: download it where the hub is reachable (hf download {repo_id}), or give a local folder")
