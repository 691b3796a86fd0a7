"""bench/quality_store.py: a stored run is reused only while its recipe resolves as it did.

The recipes are the shipped ones, resolved by kdcore's own loader; nothing trains here."""

import dataclasses
import json

from bench import quality as q
from bench.quality_report import WARM_RESULTS
from bench.quality_sections import Row, losses_section, warm_section
from bench.quality_store import Run, RunStore, content_of_data, recipe_changes, resolved_recipe


def _run(row, seed, kl, ppl, recipe):
    final = {"step": 60, "eval_teacher_kl": kl, "eval_ppl": ppl, "eval_top1_agreement": 0.2}
    return Run(row=row, seed=seed, ok=True, final=final, steps=60, tokens=100, wall_s=60.0, recipe=recipe)


def test_put_keeps_the_recipe_and_a_new_store_reuses_the_run_while_it_matches(tmp_path):
    losses = losses_section()
    row = losses.rows[0]
    recipe = resolved_recipe(losses.recipe, row.overrides)
    store = RunStore(str(tmp_path / "runs.jsonl"))
    key = store.key(losses, row, 0, None)
    store.put(key, _run(row.name, 0, 3.0, 200.0, {}), recipe)
    again = RunStore(str(tmp_path / "runs.jsonl"))
    assert again.get(key, recipe).final["eval_ppl"] == 200.0 and again.reused == 1
    # the same row with another learning rate today: the stored run is stale, and says why
    moved = resolved_recipe(losses.recipe, [*row.overrides, "train.lr=0.5"])
    assert again.get(key, moved) is None and again.stale[key] == ["train.lr"] and again.reused == 1


def test_a_run_is_found_by_what_it_trained_under_another_command(tmp_path):
    losses = losses_section()
    row = losses.rows[0]
    store = RunStore(str(tmp_path / "runs.jsonl"))
    store.put(store.key(losses, row, 0, None), _run(row.name, 0, 3.0, 200.0, {}),
              resolved_recipe(losses.recipe, row.overrides))
    # the recipe's own kd_ratio spelled out: another command, the same training
    same = Row("spelled otherwise", (*row.overrides, "distill.kd_ratio=0.5"))
    moved = Row("another learning rate", (*row.overrides, "train.lr=0.5"))
    again = RunStore(str(tmp_path / "runs.jsonl"))
    found = again.get(again.key(losses, same, 0, None), resolved_recipe(losses.recipe, same.overrides))
    assert found is not None and found.final["eval_ppl"] == 200.0
    assert again.get(again.key(losses, same, 1, None), resolved_recipe(losses.recipe, same.overrides)) is None
    assert again.get(again.key(losses, moved, 0, None), resolved_recipe(losses.recipe, moved.overrides)) is None
    # a render finds it too, under the row that spells it otherwise
    spelled = dataclasses.replace(losses, rows=(same,))
    assert [r.final["eval_ppl"] for r in q.stored_runs(spelled, again)["spelled otherwise"]] == [200.0]


def test_a_field_added_after_the_run_keeps_it_only_while_it_holds_its_default():
    now = resolved_recipe("quickstart", [])  # the quickstart sets distill.kd_at_stop false; the default is true
    before = json.loads(json.dumps(now))
    del before["distill"]["chunk_size"]  # at its default today: the run behaved as today
    assert now["distill"]["chunk_size"] == 256 and recipe_changes(before, now) == []
    del before["distill"]["kd_at_stop"]  # a run from before the field trained with KD at stop targets
    assert recipe_changes(before, now) == ["distill.kd_at_stop"]
    # a field the schema no longer has: the stored run was something today's recipe cannot say
    before["distill"]["kd_at_stop"], before["distill"]["gone"] = False, 1
    assert recipe_changes(before, now) == ["distill.gone"]


def test_a_run_under_the_other_in_process_or_process_teacher_engine_stands():
    now = resolved_recipe("quickstart", [])
    before = json.loads(json.dumps(now))
    before["teacher"]["engine"] = "hf" if now["teacher"]["engine"] == "inline" else "inline"
    assert recipe_changes(before, now) == []  # one TeacherModel: the same numbers
    before["teacher"]["engine"] = "remote"
    assert recipe_changes(before, now) == ["teacher.engine"]


def test_data_files_count_by_content_not_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt": "x", "response": "y"}\n')
    b.write_text(a.read_text())
    recipe = {"data": {"train": str(a), "eval": None}, "train": {"lr": 1e-3}}
    moved = {"data": {"train": str(b), "eval": None}, "train": {"lr": 1e-3}}
    assert content_of_data(recipe) == content_of_data(moved)
    b.write_text('{"prompt": "x", "response": "z"}\n')
    assert recipe_changes(content_of_data(recipe), content_of_data(moved)) == ["data.train"]


def test_render_only_leaves_a_stale_run_out_and_says_so_and_trusts_runs_stored_without_a_recipe(tmp_path):
    losses = losses_section()
    twin, row = losses.baseline, losses.rows[0]
    stale = resolved_recipe(losses.recipe, twin.overrides)
    stale["train"]["lr"] = 0.123  # the twin was trained with a learning rate the recipe no longer has
    store = tmp_path / "runs.jsonl"
    store.write_text(
        json.dumps({"key": RunStore.key(losses, twin, 0, None), **_run(twin.name, 0, 4.1, 224.5, stale).__dict__}) + "\n"
        + json.dumps({"key": RunStore.key(losses, row, 0, None), **_run(row.name, 0, 3.1, 216.5, {}).__dict__}) + "\n")
    out = tmp_path / "quality.md"
    assert q.main(["--render-only", "--store", str(store), "--out", str(out)]) == 0
    text = out.read_text()
    assert "224.5" not in text and "216.5" in text
    assert "1 stored runs are left out: their recipe resolves differently now (train.lr)" in text
    assert "1 of the runs shown are taken on trust: they were stored before each run kept its recipe" in text


def test_a_recipe_that_does_not_resolve_here_leaves_its_runs_shown_but_unchecked(tmp_path):
    missing = tmp_path / "absent.gguf"
    assert resolved_recipe("quickstart", [f"teacher.path={missing}"]) is None
    store = RunStore(None)
    store.done["k"] = _run("r", 0, 3.0, 200.0, {"train": {"lr": 1.0}})
    assert store.current("k", None) is not None and store.unchecked == {"k"}


def _warm_folder(tmp_path, recipe_changes=None):
    """A warm start's folder as kdcore leaves it: the export, the metrics and the resolved recipe
    it ran with (here today's, or today's with ``recipe_changes``)."""
    import hashlib

    import yaml
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import load_recipe

    warm = warm_section()
    cmd_key = json.dumps([warm.recipe, list(warm.warm.overrides), 0])
    out = tmp_path / "warm" / f"{warm.name}-seed0-{hashlib.sha1(cmd_key.encode()).hexdigest()[:10]}"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_teacher_kl": 9.0}) + "\n"
                                       + json.dumps({"step": 200, "eval_teacher_kl": 3.5}) + "\n")
    cmd = q.train_command(warm.recipe, warm.warm.overrides, 0, str(out), None, export=True)
    ran = OmegaConf.to_container(load_recipe(warm.recipe, cmd[cmd.index(warm.recipe) + 1:]), resolve=True)
    for dotted, value in (recipe_changes or {}).items():
        section, leaf = dotted.split(".")
        ran[section][leaf] = value
    (out / "recipe.yaml").write_text(yaml.safe_dump(ran))
    return warm, out


def test_a_warm_start_whose_folder_ran_todays_recipe_is_reused_and_its_legacy_record_checked(tmp_path, monkeypatch):
    warm, out = _warm_folder(tmp_path)
    monkeypatch.setattr(q.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    store = RunStore(str(tmp_path / "runs.jsonl"))
    store.done[q.warm_key(warm, 0)] = Run(row="warm start", seed=0, ok=True, final={"step": 200})  # no recipe
    args = q.parse_args(["--warm-dir", str(tmp_path / "warm")])
    extra, recipe, failed = q.warm_start(warm, 0, args, store)
    assert not failed and extra[0] == f"student.path={out / 'hf'}"
    assert store.done[q.warm_key(warm, 0)].recipe == recipe  # checked against the folder, now kept
    WARM_RESULTS.clear()


def test_a_warm_start_whose_folder_ran_another_recipe_is_trained_again(tmp_path, monkeypatch):
    warm, out = _warm_folder(tmp_path, {"train.lr": 0.5})
    calls = []

    def refuse(cmd, **kwargs):
        calls.append(cmd)
        return q.subprocess.CompletedProcess(cmd, 1, "", "refused by the test")

    monkeypatch.setattr(q.subprocess, "run", refuse)
    args = q.parse_args(["--warm-dir", str(tmp_path / "warm")])
    extra, recipe, failed = q.warm_start(warm, 0, args, RunStore(None))
    assert len(calls) == 1 and "--overwrite" in calls[0] and str(out) in " ".join(calls[0])
    assert failed == "warm start exited 1: refused by the test"


def test_a_stored_run_keeps_the_fingerprint_of_the_code_that_trained_it(tmp_path):
    from bench.quality_store import code_counts, code_fingerprint

    root = tmp_path / "tree"
    (root / "kdcore").mkdir(parents=True)
    (root / "algorithms").mkdir()
    (root / "kdcore" / "loss.py").write_text("A = 1\n")
    (root / "algorithms" / "losses.py").write_text("B = 2\n")
    first = code_fingerprint(root)
    (root / "kdcore" / "notes.md").write_text("not code")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("C = 3\n")
    assert code_fingerprint.__wrapped__(root) == first  # only the Python that trains counts
    (root / "algorithms" / "losses.py").write_text("B = 3\n")
    assert code_fingerprint.__wrapped__(root) != first

    losses = losses_section()
    row = losses.rows[0]
    store = RunStore(str(tmp_path / "runs.jsonl"))
    trained = dataclasses.replace(_run(row.name, 0, 3.0, 200.0, {}), code=code_fingerprint())  # as run_one makes it
    store.put(store.key(losses, row, 0, None), trained, None)
    stored = RunStore(str(tmp_path / "runs.jsonl")).done[store.key(losses, row, 0, None)]
    assert stored.code == code_fingerprint()
    older = _run(row.name, 1, 3.0, 200.0, {})  # stored before fingerprints were kept
    store.put(store.key(losses, row, 1, None), older, None)  # stored again (a warm start given its recipe)
    assert RunStore(str(tmp_path / "runs.jsonl")).done[store.key(losses, row, 1, None)].code == ""
    other = dataclasses.replace(stored, code="0" * 16)
    assert code_counts([stored, older, other]) == (1, 1)


def test_which_rows_get_a_kd_pair_cannot_change_a_ce_only_run():
    twin = resolved_recipe("quickstart", ["distill.kd_ratio=0"])
    before = json.loads(json.dumps(twin))
    before["distill"]["kd_at_stop"] = not twin["distill"]["kd_at_stop"]
    del before["distill"]["kd_at_opening"]
    assert recipe_changes(before, twin) == []  # no row is paired with the teacher either way
    before["distill"]["kd_ratio"] = 0.5  # a KD run: the same change counts
    assert set(recipe_changes(before, twin)) >= {"distill.kd_ratio", "distill.kd_at_stop"}
    mixed = resolved_recipe("quickstart", [])
    stored = json.loads(json.dumps(mixed))
    stored["distill"]["kd_at_opening"] = not mixed["distill"]["kd_at_opening"]
    assert recipe_changes(stored, mixed) == ["distill.kd_at_opening"]


def test_a_render_shows_the_run_of_the_same_training_in_place_of_a_stale_one(tmp_path):
    losses = losses_section()
    row = Row("x", ("distill.kd_ratio=0.5",))
    spelled = Row("y", ("distill.kd_ratio=0.5", "distill.loss=fkl"))  # the same training
    section = dataclasses.replace(losses, rows=(row,))
    store = RunStore(str(tmp_path / "runs.jsonl"))
    then = resolved_recipe(losses.recipe, [*row.overrides, "train.lr=0.5"])  # the row's command, then
    store.put(store.key(section, row, 0, None), _run("x", 0, 3.0, 900.0, {}), then)
    store.put(store.key(section, spelled, 0, None), _run("y", 0, 3.0, 200.0, {}),
              resolved_recipe(losses.recipe, spelled.overrides))
    shown = q.stored_runs(section, RunStore(str(tmp_path / "runs.jsonl")))["x"]
    assert [r.final["eval_ppl"] for r in shown] == [200.0]


def test_a_run_given_other_steps_is_shown_only_under_a_row_of_those_steps(tmp_path):
    losses = losses_section()
    row = Row("x", ("distill.kd_ratio=0.5",))
    longer = Row("x at 110", ("distill.kd_ratio=0.5", "train.max_steps=110"))
    assert q.row_recipe(losses, row, None, 110) == resolved_recipe(losses.recipe, longer.overrides)
    store = RunStore(str(tmp_path / "runs.jsonl"))
    # what `--steps 110` stores: the row's command with the steps in the key, its recipe with them
    store.put(store.key(losses, row, 0, 110), _run("x", 0, 3.0, 110.0, {}), q.row_recipe(losses, row, None, 110))
    again = RunStore(str(tmp_path / "runs.jsonl"))
    assert q.stored_runs(dataclasses.replace(losses, rows=(row,)), again) == {}
    shown = q.stored_runs(dataclasses.replace(losses, rows=(longer,)), again)["x at 110"]
    assert [r.final["eval_ppl"] for r in shown] == [110.0] and not again.stale
