"""The recipes kdflow's benchmark side trains are valid recipes (a renamed key would otherwise
surface only as a failed row, minutes into a benchmark run)."""

from bench.sides.kdflow import onpolicy_recipe, recipe_dict
from kdcore.recipe.loading import validate_raw


def test_the_off_policy_and_on_policy_bench_recipes_validate():
    off = recipe_dict("student", "teacher", "data.jsonl", 128, 4, 6, "out")
    assert validate_raw(off) == []
    on = onpolicy_recipe(recipe_dict("student", "teacher", "prompts.jsonl", 128, 4, 6, "out"), "prompts.jsonl", 64, 64)
    assert validate_raw(on) == []
    assert on["distill"]["rollout"] == "on_policy" and on["data"]["format"] == "prompt_completion"
    assert on["rollout"]["max_new_tokens"] == 64 and on["data"]["max_length"] >= 128
    # the off-policy recipe is untouched by its on-policy twin's making (a fresh mapping each)
    assert off["distill"]["rollout"] == "off_policy"
