"""The one "is this spec meant as a local path?" rule (``kdcore.modeling.paths.looks_local``) and what
each caller (data sets, models, tokenizers) does with a missing path that looks local."""

from __future__ import annotations

import pytest

from kdcore.data import DataError, read_rows, resolve_data_path
from kdcore.modeling.paths import ModelNotFoundError, is_local, looks_local


@pytest.mark.parametrize("spec, suffixes, local", [
    ("./d.jsonl", (), True),
    ("/abs/model", (), True),
    ("~/data", (), True),
    ("..", (), True),
    ("org/name", (), False),            # a hub id
    ("name", (), False),                # a hub id without an org
    ("data/sub/train", (), True),       # deeper than org/name: no hub id looks like this
    ("org/name.jsonl", (".jsonl",), True),
    ("org/name.JSONL", (".jsonl",), True),  # suffixes compare case-insensitively
    ("model.GGUF", (".gguf",), True),
    ("org/name.jsonl", (".gguf",), False),  # only the caller's own file types count
    ("org/name.v1", (), False),
])
def test_looks_local_rule(spec, suffixes, local):
    assert looks_local(spec, suffixes) is local


def test_is_local_adds_pkg_and_existing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert is_local("pkg://some_package/file") and is_local("here") and is_local("a/b/c")
    assert not is_local("org/name")


def test_data_and_model_callers_name_a_missing_local_path(tmp_path):
    from kdcore.modeling.models import locate

    # data: a file suffix alone makes it local, so a typo is "not found" rather than a hub lookup
    with pytest.raises(DataError, match="data file not found: 'org/train.jsonl'"):
        read_rows("org/train.jsonl")
    assert resolve_data_path("org/name") == "org/name"  # left to the hub
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        locate(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        locate("models/missing.gguf")
    assert locate("org/name") == ("hub", "org/name")
