"""bench/quality_store.py: a stored run is reused only while its recipe resolves as it did.

The recipes are the shipped ones, resolved by kdcore's own loader; nothing trains here."""

import json

from bench import quality as q
from bench.quality_store import Run, RunStore, content_of_data, recipe_changes, resolved_recipe


def _run(row, seed, kl, ppl, recipe):
    final = {"step": 60, "eval_teacher_kl": kl, "eval_ppl": ppl, "eval_top1_agreement": 0.2}
    return Run(row=row, seed=seed, ok=True, final=final, steps=60, tokens=100, wall_s=60.0, recipe=recipe)


def test_put_keeps_the_recipe_and_a_new_store_reuses_the_run_while_it_matches(tmp_path):
    losses = q.losses_section()
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
    losses = q.losses_section()
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
    assert "1 of the runs shown were stored before each run kept its recipe" in text
