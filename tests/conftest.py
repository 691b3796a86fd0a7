"""Shared fixtures: tiny models built from a config around a real tokenizer (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.assets import DIST_SCRIPTS, PYDOC, PYDOC_EVAL, ROOT, SMOLLM2_GGUF, save_tiny_llama  # noqa: F401


# Keep converted GGUFs and vocab maps of the test run out of the user's cache, but share them
# across the session's processes.
os.environ.setdefault("KDCORE_CACHE", str(Path(os.environ.get("PYTEST_KDCORE_CACHE", "/tmp/kdflow-test-cache"))))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kdcore.modeling.tokenizers import load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm2_tokenizer) -> Path:
    # a wide init gives peaked next-token distributions, so there is something to distill
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm2_tokenizer, hidden=64, layers=2,
                           init_std=0.3)


@pytest.fixture(scope="module")
def cpu_process_group():
    """A one-rank gloo process group for the module (``pytestmark = pytest.mark.usefixtures(...)``);
    torn down afterwards only when this fixture created it."""
    from kdcore.infra import distributed as kdist

    owned = not kdist.is_initialized()
    kdist.init_distributed("cpu")
    yield
    if owned:
        kdist.teardown()


def _make_vl_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vl_data", ROOT / "scripts" / "make_vl_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def vl_assets(tmp_path_factory):
    """The VL quickstart's generator run into a temporary folder: a small data set (images on
    disk, rows with relative paths) and the tiny LLaVA teacher/student and text student."""
    mod = _make_vl_module()
    root = tmp_path_factory.mktemp("vl")
    files = mod.make_data(root, n_train=24, n_eval=8, seed=0)
    models = mod.make_models(root / "models")
    return {"root": root, "module": mod, **files, **models}
