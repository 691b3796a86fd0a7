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


def test_the_seqkd_recipe_is_the_answers_row_it_cites():
    """recipes/seqkd.yaml quotes the answers section's row "seqkd with CE on the references": it
    must train what that row trained (the quickstart with the row's overrides)."""
    from omegaconf import OmegaConf

    from bench.quality_sections import SEQKD_CE_ON_DATA, SECTIONS
    from kdcore.recipe.loading import load_recipe

    section = SECTIONS["answers"]()
    row = next(r for r in section.rows if r.name == "seqkd with CE on the references")
    assert set(SEQKD_CE_ON_DATA) <= set(row.overrides) and section.recipe == "quickstart"

    def plain(cfg):
        out = OmegaConf.to_container(cfg, resolve=True)
        out["train"].pop("output_dir")
        return out

    assert plain(load_recipe("seqkd")) == plain(load_recipe("quickstart", list(SEQKD_CE_ON_DATA)))
