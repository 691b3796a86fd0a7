"""Recipe schema and validation: every shipped recipe validates; errors are collected at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import kdcore
from kdcore.recipe.loading import Recipe, RecipeError, load_recipe, validate_raw

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.y*ml"))


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def _absent_gguf_overrides(path: Path, stand_in: Path) -> list[str]:
    """Overrides pointing every model path of the recipe that names an absent .gguf at ``stand_in``."""
    from kdcore.modeling.models import locate
    from kdcore.modeling.paths import ModelNotFoundError

    def absent(spec: str) -> bool:
        try:
            locate(spec)
        except ModelNotFoundError:
            return True
        return False

    raw = OmegaConf.to_container(OmegaConf.load(path))
    sections = [(f"teachers.{i}", e) for i, e in enumerate(raw.get("teachers") or [])]
    sections += [(k, raw.get(k) or {}) for k in ("teacher", "student")]
    return [f"{key}.path={stand_in}" for key, sec in sections
            if str(sec.get("path", "")).endswith(".gguf") and absent(sec["path"])]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path, request, tmp_path):
    overrides = []
    if path.name == "vl_quickstart.yaml" and not (path.parent / "data/vl_shapes/models/teacher").is_dir():
        # its models are built by scripts/make_vl_data.py, not committed: use the test's build
        vl = request.getfixturevalue("vl_assets")
        overrides = [f"teacher.path={vl['teacher']}", f"student.path={vl['student']}"]
    stand_in = tmp_path / "stand-in.gguf"
    absent = _absent_gguf_overrides(path, stand_in)
    if absent:
        # a model that a setup script installs (Gemma from PyPI, ~250 MB) is absent on a new machine:
        # validation must fail with one line per missing file that names the script making it
        with pytest.raises(RecipeError) as info:
            load_recipe(str(path), overrides)
        setup = OmegaConf.load(path).get("setup")
        assert setup and setup.startswith(("bash scripts/", "python scripts/")), f"{path}: no setup command"
        assert (ROOT / setup.split()[1]).is_file(), f"{path}: setup names a missing script: {setup}"
        assert len(info.value.errors) == len(absent)
        assert all(f"(made by: {setup})" in e and "no such file" in e for e in info.value.errors), info.value.errors
        # the rest of the recipe still validates with the missing file stood in for
        stand_in.write_bytes(b"")
        overrides += absent
    cfg = load_recipe(str(path), overrides)
    assert cfg.teacher.path
    assert Path(cfg.data.train).exists(), f"{path}: data.train {cfg.data.train} missing"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path}: the header comment says how to run it"


def test_recipe_found_by_name_and_overrides_apply():
    cfg = load_recipe("quickstart", ["train.lr=1e-3", "distill.loss=rkl"])
    assert cfg.train.lr == 1e-3 and cfg.distill.loss == "rkl"
    assert Path(cfg.data.train).is_absolute()  # resolved beside the recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_all_errors_reported_at_once(tmp_path):
    path = write(tmp_path, """
teacher:
  path: some/model
  engnie: hf
data:
  train: x.jsonl
  max_length: "long"
distill:
  loss: fkll
  temperature: -1
train:
  precision: fp16
  lr: 1e-4
  lrr: 3
""")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "teacher.engnie: unknown key; did you mean 'teacher.engine'" in msg
    assert "train.lrr: unknown key; did you mean 'train.lr'" in msg
    assert "data.max_length: expected int" in msg
    assert "distill.loss: unknown loss 'fkll'" in msg and "fkl" in msg
    assert "train.precision: 'fp16' is not one of fp32, bf16" in msg
    assert len(err.value.errors) >= 5


def test_ranges_and_required(tmp_path):
    errors = validate_raw({"data": {"train": "x"}, "distill": {"kd_ratio": 1.5, "temperature": 0},
                           "student": {"init": "truncate"}})
    joined = "\n".join(errors)
    assert "teacher.path: required" in joined
    assert "distill.kd_ratio: must be within [0, 1]" in joined
    assert "distill.temperature: must be > 0" in joined
    assert "student.num_layers: required when student.init is 'truncate'" in joined


def test_truncate_without_num_layers_is_reported_once():
    errors = validate_raw({"teacher": {"path": "t"}, "data": {"train": "x"}, "student": {"init": "truncate"}})
    assert errors.count("student.num_layers: required when student.init is 'truncate'") == 1
    assert validate_raw({"teacher": {"path": "t"}, "data": {"train": "x"},
                         "student": {"init": "truncate", "num_layers": 2}}) == []


def test_engine_names_come_from_the_registry():
    errors = validate_raw({"teacher": {"path": "t", "engine": "vllm"}, "data": {"train": "x"}})
    assert errors == ["teacher.engine: unknown engine 'vllm'; installed: cache, hf, inline, remote, sglang"]


def test_rollout_sglang_section_is_checked_like_the_teachers():
    """rollout.sglang went unchecked before the engine registry; the rollout server needs no
    hidden-state path, so the teacher-only fixed arguments are not enforced there."""
    raw = {"teacher": {"path": "t"}, "data": {"train": "x"},
           "rollout": {"engine": "sglang", "sglang": {"quantization": "fp9", "server_url": "localhost:1",
                                                      "server_args": {"tp_size": 2, "disable_radix_cache": False},
                                                      "mem_fraction_static": 1.5}}}
    assert validate_raw(raw) == [
        "rollout.sglang.mem_fraction_static: must be within (0, 1), got 1.5",
        "rollout.sglang.quantization: 'fp9' is not a quantization sglang 0.5.23 knows; did you mean 'fp8'?",
        "rollout.sglang.server_url: 'localhost:1' must start with http:// or https://",
        "rollout.sglang.server_args.tp_size: set it through the recipe (rollout.sglang / rollout.dtype), not server_args",
    ]
    # the same section under an hf rollout engine is not sglang's to check (its ranges still are)
    raw["rollout"]["engine"] = "hf"
    assert validate_raw(raw) == ["rollout.sglang.mem_fraction_static: must be within (0, 1), got 1.5"]


def test_config_imports_no_engine_runtime():
    import subprocess
    import sys

    # validation loads the registry, so every built-in engine's spec and checks: none may pull its
    # engine in (torch may come with the algorithm plugins, not with an engine)
    code = ("import sys, kdcore.recipe.loading\n"
            "print(sorted(m for m in ('torch', 'sglang', 'kdcore.infra.channel', 'kdcore.engines.hf.teacher') if m in sys.modules))\n"
            "for engine in ('hf', 'sglang', 'remote', 'cache'):\n"
            "    kdcore.recipe.loading.validate_raw({'teacher': {'path': 'm', 'engine': engine}, 'data': {'train': 'x'}})\n"
            "print(sorted(m for m in ('sglang', 'zmq', 'kdcore.infra.channel', 'kdcore.engines.hf.teacher', "
            "'kdcore.engines.hf.child', 'kdcore.engines.sglang.teacher', 'kdcore.engines.remote.client', "
            "'kdcore.engines.cache.teacher') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]


def test_algorithm_options_checked_against_the_plugin_dataclass(tmp_path):
    base = {"teacher": {"path": "m"}, "data": {"train": "x"}}
    errs = validate_raw({**base, "distill": {"loss": "ab_div", "loss_options": {"alpah": 0.2, "beta": "x"}}})
    joined = "\n".join(errs)
    assert "distill.loss_options.alpah: unknown key; did you mean 'distill.loss_options.alpha'" in joined
    assert "distill.loss_options.beta: expected float" in joined
    # value checks of the dataclass itself surface too
    errs = validate_raw({**base, "distill": {"loss": "ab_div", "loss_options": {"alpha": 0.0}}})
    assert any("rejects" in e and "alpha" in e for e in errs)
    # an algorithm without options rejects any
    errs = validate_raw({**base, "distill": {"rollout": "off_policy", "rollout_options": {"x": 1}}})
    assert any("takes no options" in e for e in errs)


def test_example_plugin_can_be_chosen_in_a_recipe():
    cfg = load_recipe("quickstart", ["distill.loss=ab_div", "distill.loss_options.alpha=0.2"])
    entry = kdcore.load_registry().get("loss", cfg.distill.loss)
    opts = entry.make_options(OmegaConf.to_container(cfg.distill.loss_options))
    assert opts.alpha == 0.2 and opts.beta == 0.5


def test_missing_recipe_suggests_shipped_ones():
    with pytest.raises(RecipeError, match="quickstart"):
        load_recipe("quickstrat")


def test_every_default_has_a_reason_comment():
    """nanoGPT rule: each default in the schema carries its reason (or is self-evident)."""
    import inspect

    from kdcore.recipe import schema as config

    self_evident = {"output_dir", "seed", "lr", "loss_options", "aligner_options", "rollout_options",
                    "teacher", "student", "data", "distill", "train", "checkpoint", "logging", "sglang",
                    "min_lr_ratio", "path"}
    missing = []
    for cls in vars(config).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ in (config.__name__, config.SGLangConfig.__module__)):
            continue
        for line in inspect.getsource(cls).splitlines()[1:]:
            stripped = line.strip()
            name = stripped.split(":")[0]
            if name.isidentifier() and "=" in stripped and "#" not in stripped and name not in self_evident:
                missing.append(f"{cls.__name__}.{name}")
    assert not missing, f"defaults without a reason comment: {missing}"


def test_schema_is_a_dataclass_tree():
    assert dataclasses.is_dataclass(Recipe)
    OmegaConf.structured(Recipe)  # omegaconf accepts the schema


def test_override_reaches_into_a_list_of_teachers():
    cfg = load_recipe("multi_teacher", ["teachers.1.weight=0", "teachers.0.temperature=1.5"])
    assert cfg.teachers[1].weight == 0 and cfg.teachers[0].temperature == 1.5
    assert cfg.teachers[0].weight == 0.75  # the rest of the entry is kept


def test_override_past_the_end_of_a_list_is_one_error():
    with pytest.raises(RecipeError, match=r"override 'teachers\.5\.weight=0'.*index out of range"):
        load_recipe("multi_teacher", ["teachers.5.weight=0"])


@pytest.mark.parametrize("name", ["quickstart", "multi_teacher"])
def test_a_run_folders_saved_recipe_loads_back(tmp_path, name):
    """``kdcore eval RUN`` and a new run read ``RUN/recipe.yaml``: the resolved recipe must validate."""
    from kdcore.storage.run_folder import save_recipe

    cfg = load_recipe(name)
    again = load_recipe(str(save_recipe(tmp_path, cfg)))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_a_recipe_name_resolves_from_any_working_directory(tmp_path, monkeypatch):
    """The shipped recipes are found beside kdcore/ wherever the command runs (the lookup
    counts folders up from its own file, so moving the module must move the count)."""
    from kdcore.recipe.loading import resolve_recipe

    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("quickstart") == Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
