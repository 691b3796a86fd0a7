"""bench/quality.py's store of finished runs: a section run into the report keeps the others.

No training here: every run the invocation plans is already in the store, and the warm start's
export is a folder with a config.json (what ``warm_start`` checks before training one)."""

import hashlib
import json

from bench import quality as q
from bench.quality_report import (WARM_RESULTS, beats, findings_table, render_section, same_seeds, section_table,
                                  warm_text)
from bench.quality_sections import PPL, losses_section, repair_section, warm_section
from bench.quality_store import Run, RunStore


def _run(row, seed, kl, ppl, **extra):
    final = {"step": 40, "eval_teacher_kl": kl, "eval_ppl": ppl, "eval_top1_agreement": 0.3, **extra}
    return Run(row=row, seed=seed, ok=True, final=final, initial={"step": 0, "eval_teacher_kl": 9.0},
               steps=40, tokens=100, wall_s=60.0).__dict__


def _line(key, run):
    return json.dumps({"key": key, **run}) + "\n"


def _warm_dir(tmp_path, section, seed=0):
    cmd_key = json.dumps([section.recipe, list(section.warm.overrides), seed])
    out = tmp_path / "warm" / f"{section.name}-seed{seed}-{hashlib.sha1(cmd_key.encode()).hexdigest()[:10]}"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")
    curve = [{"step": s, "eval_teacher_kl": kl, "eval_ppl": ppl, "eval_top1_agreement": 0.2}
             for s, kl, ppl in ((0, 14.0, 1.6e7), (25, 5.0, 400.0), (50, 4.0, 120.0))]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return out


def test_running_one_section_keeps_the_stored_sections_and_renders_the_warm_curve(tmp_path):
    losses, warm = losses_section(), warm_section()
    export = _warm_dir(tmp_path, warm) / "hf"
    extra = [f"student.path={export}", "student.init=pretrained"]
    store = tmp_path / "runs.jsonl"
    store.write_text(
        # a committed losses section, trained by an earlier invocation
        _line(RunStore.key(losses, losses.baseline, 0, None), _run("CE only", 0, 4.1, 224.0))
        + _line(RunStore.key(losses, losses.rows[0], 0, None), _run("quickstart", 0, 3.1, 216.0))
        # the warm section's twin and one row, already trained from the warm start above
        + _line(RunStore.key(warm, warm.baseline, 0, None, extra), _run("CE continuation", 0, 3.9, 115.0))
        + _line(RunStore.key(warm, warm.rows[0], 0, None, extra), _run("qs", 0, 2.9, 110.0)))
    out = tmp_path / "quality.md"
    rc = q.main(["--sections", "warm", "--seeds", "0", "--other-seeds", "0", "--rows", warm.rows[0].name,
                 "--store", str(store), "--warm-dir", str(tmp_path / "warm"), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    # the section this invocation did not run is still in the report, before the warm one
    assert f"## {losses.title}" in text and f"## {warm.title}" in text
    assert text.index(losses.title) < text.index(warm.title)
    assert "224.0" in text and "216.0" in text
    # the answers section shares the twin's and the quickstart's commands, hence these runs
    assert "Sections `losses`, `answers` were not trained by this invocation" in text
    # the warm start's curve, read from its run folder and kept in the store for later renders
    assert "| 25 | 5.000 | 400.0 |" in text
    assert any(json.loads(ln)["key"] == q.warm_key(warm, 0) for ln in store.read_text().splitlines())


def test_the_warm_curve_renders_from_the_store_alone(tmp_path):
    warm = warm_section()
    store = RunStore(None)
    curve = [{"step": 0, "eval_teacher_kl": 14.0, "eval_ppl": 1.6e7}, {"step": 200, "eval_teacher_kl": 3.5, "eval_ppl": 90.0}]
    store.done[q.warm_key(warm, 0)] = Run(row="warm start", seed=0, ok=True, final=curve[-1], curve=curve, wall_s=300)
    WARM_RESULTS.clear()
    assert q.stored_runs(warm, store) == {}  # no rows yet: the warm start is not a row
    assert "| 200 | 3.500 | 90.0 |" in warm_text(warm)
    WARM_RESULTS.clear()


def test_render_only_trains_nothing_and_shows_a_warm_section_with_only_its_curve(tmp_path):
    losses, warm = losses_section(), warm_section()
    curve = [{"step": 0, "eval_teacher_kl": 14.0, "eval_ppl": 1.6e7}, {"step": 200, "eval_teacher_kl": 3.5, "eval_ppl": 90.0}]
    store = tmp_path / "runs.jsonl"
    store.write_text(_line(RunStore.key(losses, losses.baseline, 0, None), _run("CE only", 0, 4.1, 224.0))
                     + _line(q.warm_key(warm, 0), Run(row="warm start", seed=0, ok=True, final=curve[-1],
                                                      curve=curve, wall_s=600).__dict__))
    out = tmp_path / "quality.md"
    # no warm dir, no export: a run attempt would fail or train; --render-only must not try
    assert q.main(["--sections", "warm", "--render-only", "--store", str(store), "--warm-dir", str(tmp_path / "none"),
                   "--out", str(out)]) == 0
    text = out.read_text()
    assert f"## {losses.title}" in text and f"## {warm.title}" in text and "| 200 | 3.500 | 90.0 |" in text
    assert not (tmp_path / "none").exists()
    WARM_RESULTS.clear()


def test_findings_table_judges_each_published_direction_on_its_primary_metrics():
    def runs(name, **final):
        return [Run(row=name, seed=0, ok=True, final=final)]

    warm = {"on_policy": runs("on_policy", rouge_l_vs_reference=0.21, rouge_l_vs_teacher=0.13),
            "quickstart, KD at stop targets": runs("qs", rouge_l_vs_reference=0.17, rouge_l_vs_teacher=0.15),
            "skl kd_ratio=1": runs("skl", rouge_l_vs_reference=0.2, rouge_l_vs_teacher=0.2),
            "fkl kd_ratio=1": runs("fkl", rouge_l_vs_reference=0.1, rouge_l_vs_teacher=0.1)}
    losses = {"akl kd_ratio=1": runs("akl", eval_teacher_kl=3.2, eval_ppl=625.0),
              "fkl kd_ratio=1": runs("fkl", eval_teacher_kl=2.8, eval_ppl=358.0)}
    lines = {ln.split(" | ")[2]: ln for ln in findings_table({"warm": warm, "losses": losses}).splitlines()
             if ln.startswith("| ") and " vs " in ln}
    assert lines["`warm`: on_policy vs quickstart, KD at stop targets (seeds 0)"].endswith("| mixed (1 of 2) |")
    assert lines["`warm`: skl kd_ratio=1 vs fkl kd_ratio=1 (seeds 0)"].endswith("| reproduced |")
    assert lines["`losses`: akl kd_ratio=1 vs fkl kd_ratio=1 (seeds 0)"].endswith("| not reproduced |")
    assert "teacher-KL 3.200 vs 2.800; ppl 625.0 vs 358.0" in lines["`losses`: akl kd_ratio=1 vs fkl kd_ratio=1 (seeds 0)"]
    assert lines["`warm`: srkl kd_ratio=1 vs rkl kd_ratio=1"].endswith("| not run |")  # a row missing
    assert lines["`repair`: KD repair, pure fkl vs CE repair"].endswith("| not run |")  # section not run


def test_the_repair_section_renders_each_rows_curve_as_the_mean_over_its_seeds():
    repair = repair_section()

    def with_curve(row, seed, ppls, kl=3.0):
        run = Run(**_run(row, seed, kl, ppls[-1]))
        run.curve = [{"step": s, "eval_teacher_kl": 4.0, "eval_ppl": p} for s, p in zip((0, 25, 50), ppls)]
        return run

    runs = {"CE repair": [with_curve("CE repair", 0, (1e7, 300.0, 100.0)), with_curve("CE repair", 1, (1e7, 500.0, 120.0))],
            "KD repair, pure fkl": [with_curve("KD repair, pure fkl", 0, (1e7, 200.0, 90.0), kl=2.5)]}
    text = render_section(repair, runs)
    curve_lines = [ln for ln in text.splitlines() if ln.startswith("| 25 |") or ln.startswith("| 50 |")]
    # step 25: CE's two seeds average to 400.0, pure fkl's one seed is 200.0
    assert curve_lines[0].split("|")[1:6] == [" 25 ", " 4.000 ", " 400.0 ", " 4.000 ", " 200.0 "]
    assert curve_lines[1].split("|")[3].strip() == "110.0"
    assert "CE repair 0,1; KD repair, pure fkl 0" in text
    # the Minitron findings are judged on this section's rows, not reported "not run" when they exist
    findings = findings_table({"repair": runs})
    minitron = next(ln for ln in findings.splitlines() if ln.startswith("| Minitron (Muralidharan"))
    assert minitron.endswith("| teacher-KL 2.500 vs 3.000; ppl 90.0 vs 100.0 | reproduced |")


def test_a_row_is_compared_with_the_twin_of_its_own_seeds():
    """A twin of four seeds and a row of one: the ratio and the verdict use the twin's seed 0 only."""
    twin = [Run(**_run("CE only", s, 4.0, ppl)) for s, ppl in ((0, 200.0), (1, 300.0), (2, 300.0), (3, 300.0))]
    row = [Run(**_run("r", 0, 3.0, 220.0))]
    assert [r.seed for r in same_seeds(row, twin)] == [0]
    assert beats(row, twin, PPL) == ""  # 220 > 200 on seed 0, though below the 4-seed mean 275
    section = losses_section()
    text = section_table(section, {section.baseline.name: twin, section.rows[0].name: row})
    assert "1.10×" in text.splitlines()[-1]  # ppl 220 ÷ 200, not ÷ 275


def test_rank_correlation_against_the_textbook_formula_and_a_tied_case():
    import random

    from bench.quality_report import rank_correlation

    rng = random.Random(3)
    xs, ys = rng.sample(range(100), 12), rng.sample(range(100), 12)
    rx = {v: i for i, v in enumerate(sorted(xs))}
    ry = {v: i for i, v in enumerate(sorted(ys))}
    d2 = sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys))
    n = len(xs)
    assert abs(rank_correlation(xs, ys) - (1 - 6 * d2 / (n * (n * n - 1)))) < 1e-12  # no ties: Spearman's own formula
    # ties share their mean rank: x ranks (0, 1.5, 1.5, 3) against y ranks (3, 2, 1, 0)
    assert abs(rank_correlation([1, 2, 2, 4], [4, 3, 2, 1]) - (-0.9486832980505138)) < 1e-12


def test_the_answers_section_reports_how_its_answer_criteria_move_with_length():
    from bench.quality_report import length_line, rank_correlation
    from bench.quality_sections import answers_section

    section = answers_section()

    def run(seed, words, rouge, loops):
        return Run(row="r", seed=seed, ok=True, final={"answer_words_student": words, "rouge_l_vs_teacher": rouge,
                                                        "repetition_student": loops})

    # rouge rises with length in row a and falls in row b; loops rise with length in a, none in b
    runs = {"a": [run(s, w, w / 100, w / 1000) for s, w in enumerate((3, 5, 8, 13, 21))],
            "b": [run(s, w, 0.5 - w / 100, 0.0) for s, w in enumerate((4, 6, 9))]}
    words = [3, 5, 8, 13, 21, 4, 6, 9]
    rouge = [w / 100 for w in words[:5]] + [0.5 - w / 100 for w in words[5:]]
    loops = [w / 1000 for w in words[:5]] + [0.0] * 3
    line = length_line(section, runs)
    assert "8 runs" in line and line.endswith(
        f"is {rank_correlation(words, rouge):.2f}, and with repeated 4-grams {rank_correlation(words, loops):.2f}.")
    assert length_line(section, {"a": runs["a"]}) == ""  # too few runs to say anything
    for r in runs["a"]:  # kdcore eval scores the teacher's and the references' own answers too
        r.final.update(repetition_teacher=0.015, answer_words_teacher=21.7, repetition_reference=0.0,
                       answer_words_reference=11.5)
    assert length_line(section, runs).endswith(" Scored the same way, the teacher's own answers repeat 0.015 of their "
                                               "4-grams at 21.7 words and the references' own answers repeat 0.000 of "
                                               "their 4-grams at 11.5 words.")
