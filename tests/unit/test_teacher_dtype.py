"""``teacher.dtype: auto``: bf16 where the device multiplies bf16 natively, fp32 elsewhere,
resolved when the recipe loads so that the run folder records the value used."""

from __future__ import annotations

import pytest

from kdcore.modeling import models
from kdcore.storage import run_folder as rf
from kdcore.recipe.loading import load_recipe, resolve_auto_dtypes


@pytest.mark.parametrize("flags, want", [
    ({"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # Cooper Lake, Zen 4
    ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "float32"),  # AVX-512 without bf16 (Ice Lake)
    ({"avx2", "fma"}, "float32"),
    (set(), "float32"),  # flags unknown (not Linux): the exact default
])
def test_cpu_detection_from_fed_flag_sets(flags, want):
    dtype, why = models.auto_dtype("cpu", flags=flags)
    assert dtype == want
    assert ("amx_bf16" in why or "avx512_bf16" in why)  # the reason names what was looked for


def test_cuda_detection_and_its_fallback():
    assert models.auto_dtype("cuda:0", cuda_bf16=True)[0] == "bfloat16"
    assert models.auto_dtype("cuda", cuda_bf16=False) == ("float32", "the CUDA device has no native bf16")
    # device auto without a GPU is decided by the CPU's flags
    assert models.auto_dtype("auto", cuda=False, flags={"avx512_bf16"})[0] == "bfloat16"
    assert models.auto_dtype("auto", cuda=False, flags={"avx2"})[0] == "float32"
    assert models.auto_dtype("auto", cuda=True, cuda_bf16=True)[0] == "bfloat16"


def test_cpu_flags_reads_cpuinfo_and_an_unreadable_file_means_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx512_bf16 amx_tile\n")
    assert models.cpu_flags(str(info)) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert models.cpu_flags(str(tmp_path / "absent")) == set()


def test_every_teacher_section_is_resolved_and_explicit_values_are_kept(monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda path="/proc/cpuinfo": {"avx2"})
    raw = {"teachers": [{"name": "a", "dtype": "auto", "device": "cpu"}, {"name": "b", "dtype": "bfloat16"},
                        {"name": "c", "dtype": "auto", "device": "cpu"}]}
    done = resolve_auto_dtypes(raw)
    assert [t["dtype"] for t in raw["teachers"]] == ["float32", "bfloat16", "float32"]
    assert set(done) == {"teachers[0]", "teachers[2]"}


def test_the_run_folder_records_the_resolved_dtype(tmp_path, monkeypatch):
    # one recipe load (the fp32 fallback of the same path is the raw-dict test above)
    monkeypatch.setattr(models, "cpu_flags", lambda path="/proc/cpuinfo": {"avx2", "amx_bf16"})
    out = tmp_path / "run"
    cfg = load_recipe("quickstart", ["teacher.dtype=auto", "teacher.device=cpu", f"train.output_dir={out}"])
    assert cfg.teacher.dtype == "bfloat16"
    out.mkdir()
    rf.save_recipe(out, cfg)  # what the trainer's run-folder preparation writes for a fresh run
    assert rf.load_saved_recipe(out)["teacher"]["dtype"] == "bfloat16"
