"""Checkpoints that cannot run code, are verified before use, fall back past damaged ones,
load strictly, and fail to save cleanly (disk full)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from dist_scripts.common import HIDDEN, tiny_llama
from kdcore.storage import checkpoint as ck
from kdcore.modeling.student import build_optimizer, build_scheduler, shard_student
from helpers.checkpoints import assert_same, snapshot, trained_setup
from helpers.checkpoint_edits import _cut_recipe, _rewrite_manifest

pytestmark = pytest.mark.usefixtures("cpu_process_group")


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory(prefix="kdflow_ckpt_safety_") as d:
        yield Path(d)


class _Bait:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save(work, step, seed=0, steps=1, **kw):
    model, proj, opt, sched = trained_setup(seed=seed, steps=steps)
    return ck.save_checkpoint(work, step, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj], **kw)


def _fresh():
    return trained_setup(seed=9, steps=0)


def _load_latest(work, warnings=None):
    m, p, o, s = _fresh()
    return ck.load_latest(work, model=m, optimizer=o, scheduler=s, extra_modules=[p],
                          warn=(warnings.append if warnings is not None else print))


def test_no_pickles_are_written_or_loaded_with_weights_only_false(work):
    path = _save(work, 1)
    names = sorted(p.name for p in path.iterdir())
    assert "trainer_state.json" in names and "rank_0.safetensors" in names and "manifest.json" in names
    assert not [n for n in names if n.endswith((".pt", ".pkl"))]
    assert "weights_only=False" not in Path(ck.__file__).read_text()


def test_malicious_pickle_planted_as_the_old_file_names_never_runs(work):
    path = _save(work, 1)
    marker = work / "pwned"
    for name in ("trainer_state.json", "manifest.json", "rank_0.safetensors"):
        (path / name).unlink()
    for name in ("trainer_state.pt", "rank_0.pt"):
        (path / name).write_bytes(pickle.dumps(_Bait(marker)))
    m, p, o, s = _fresh()
    with pytest.raises(ck.CheckpointError, match="older kdflow as pickles") as err:
        ck.load_checkpoint(path, model=m, optimizer=o, scheduler=s, extra_modules=[p])
    assert "\n" not in str(err.value)
    with pytest.raises(ck.CheckpointError, match="older kdflow"):
        _load_latest(work)
    assert not marker.exists()
    pickle.loads((path / "rank_0.pt").read_bytes())  # the bait is real: plain unpickling runs it
    assert marker.exists()


def _as_legacy(path: Path) -> None:
    """The checkpoint as kdflow wrote it before its DCP metadata was JSON: DCP's own pickled
    ``.metadata``, a manifest without a format."""
    from kdcore.storage.safe_dcp import read_metadata

    (path / ".metadata").write_bytes(pickle.dumps(read_metadata(path)))
    (path / "dcp.json").unlink()
    _rewrite_manifest(path, legacy=True)


def _short_str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global_call(module: str, name: str, *args) -> bytes:
    """A protocol-4 pickle that looks ``module``/``name`` up with STACK_GLOBAL (which resolves a
    dotted name attribute by attribute) and calls it with ``args``: a planted file's payload."""
    return b"\x80\x04" + _short_str(module) + _short_str(name) + b"\x93" + pickle.dumps(args, protocol=2)[2:-1] + b"R."


_DCP_META = "torch.distributed.checkpoint.metadata"


def _dotted_path_to(module_name: str) -> str:
    """A dotted path from DCP's metadata module's globals to ``module_name`` through the modules
    it imports (e.g. ``torch.utils.collect_env.subprocess``): what the issue's payload walked."""
    import importlib
    import types
    import warnings

    importlib.import_module("torch.utils.collect_env")  # one path at least, whatever torch imported so far
    start = importlib.import_module(_DCP_META)
    queue, seen = [("", start)], {id(start)}
    with warnings.catch_warnings():  # some torch attributes warn when they are looked at
        warnings.simplefilter("ignore")
        while queue:
            path, mod = queue.pop(0)
            for key, value in list(vars(mod).items()):
                if isinstance(value, types.ModuleType) and id(value) not in seen:
                    seen.add(id(value))
                    dotted = f"{path}.{key}" if path else key
                    if value.__name__ == module_name:
                        return dotted
                    queue.append((dotted, value))
    raise AssertionError(f"no path to {module_name}")


def _payloads(marker: Path) -> dict[str, bytes]:
    popen = _dotted_path_to("subprocess") + ".Popen"
    assert popen.startswith("torch.") and popen.endswith("subprocess.Popen")
    shell = ["sh", "-c", f"touch {marker}"]
    return {
        "popen": _global_call(_DCP_META, popen, shell),
        "cdll_via_metadata": _global_call(_DCP_META, "torch.ctypes.CDLL", None),
        "cdll_via_torch": _global_call("torch", "ctypes.CDLL", None),
        "os_system": _global_call(_DCP_META, "os.system", f"touch {marker}"),
        "allowed_module_dotted": _global_call("torch.serialization", "_get_layout.__globals__", ()),
        # an allowed callable with a hostile argument, and an allowed class that is not DCP metadata
        "allowed_call_bad_arg": _global_call("torch.serialization", "_get_layout", "no_such_layout"),
        "allowed_class_not_metadata": _global_call("pathlib", "PosixPath", "/etc/passwd"),
    }


_REFUSAL = {"allowed_call_bad_arg": "KeyError", "allowed_class_not_metadata": "not DCP metadata: PosixPath"}


def test_the_issue_payloads_are_real(work):
    """Plain unpickling runs them: the Popen one creates the marker, CDLL opens a library."""
    import ctypes

    marker = work / "pwned"
    pickle.loads(_payloads(marker)["popen"]).wait()
    assert marker.exists()
    assert isinstance(pickle.loads(_payloads(marker)["cdll_via_metadata"]), ctypes.CDLL)


@pytest.mark.parametrize("name", ["popen", "cdll_via_metadata", "cdll_via_torch", "os_system",
                                  "allowed_module_dotted", "allowed_call_bad_arg", "allowed_class_not_metadata"])
def test_a_planted_pickled_metadata_never_runs_and_an_older_checkpoint_is_used(work, name):
    _save(work, 1)
    newest = _save(work, 2)
    _as_legacy(newest)  # the only form in which kdflow still unpickles anything
    marker = work / "pwned"
    (newest / ".metadata").write_bytes(_payloads(marker)[name])
    _rewrite_manifest(newest, legacy=True)  # the manifest does not stop it: it is unsigned
    warnings: list[str] = []
    state = _load_latest(work, warnings)
    assert not marker.exists()
    assert state.step == 1 and state.path == work / "step_1"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    refusal = _REFUSAL.get(name, "refusing to load")
    assert f"{newest / '.metadata'}' is refused" in warnings[0] and refusal in warnings[0]
    m, p, o, s = _fresh()
    with pytest.raises(ck.CorruptCheckpointError, match=refusal):
        ck.load_checkpoint(newest, model=m, optimizer=o, scheduler=s, extra_modules=[p])
    assert not marker.exists()


def test_a_legacy_checkpoint_still_loads_through_the_allow_list(work):
    model, proj, opt, sched = trained_setup(steps=1)
    expected = snapshot(model, proj, opt)
    path = ck.save_checkpoint(work, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    _as_legacy(path)
    state = _load_latest(work)
    assert state.step == 1
    m, p, o, s = _fresh()
    ck.load_checkpoint(path, model=m, optimizer=o, scheduler=s, extra_modules=[p])
    assert_same(snapshot(m, p, o), expected)


def test_a_pickle_planted_beside_the_json_metadata_is_refused_or_never_read(work):
    _save(work, 1)
    newest = _save(work, 2)
    assert (newest / "dcp.json").is_file() and not (newest / ".metadata").exists()
    marker = work / "pwned"
    (newest / ".metadata").write_bytes(_payloads(marker)["popen"])
    warnings: list[str] = []
    assert _load_latest(work, warnings).step == 1  # a file the manifest does not list: refused
    assert len(warnings) == 1 and "'.metadata', which its manifest.json does not list" in warnings[0]
    _rewrite_manifest(newest)  # listed: still never read, the JSON metadata is
    assert _load_latest(work).step == 2
    assert not marker.exists()


def _first_tensor(obj):
    return next(v for v in obj["state"].values() if "dtype" in v)


_JSON_EDITS = {
    "dtype_list": lambda o: _first_tensor(o).update(dtype=["float32"]),
    "dtype_unknown": lambda o: _first_tensor(o).update(dtype="subprocess"),
    "size_text": lambda o: _first_tensor(o).update(size=["32"]),
    "file_in_subfolder": lambda o: o["storage"][0].update(file="sub/__0_0.distcp"),
    "file_absolute": lambda o: o["storage"][0].update(file="/etc/passwd"),
    "pos_negative": lambda o: o["storage"][0].update(pos=-1),
    "length_text": lambda o: o["storage"][0].update(length="10"),
    "format_other": lambda o: o.update(format=2),
    "entry_a_list": lambda o: o["state"].update(x=[1]),
    "planner_object": lambda o: o.update(planner={"x": [{"a": 1}]}),
}


@pytest.mark.parametrize("edit", sorted(_JSON_EDITS))
def test_json_metadata_with_a_wrong_type_or_name_is_refused(work, edit):
    from kdcore.storage.safe_dcp import MetadataError, metadata_from_json

    obj = json.loads((_save(work, 1) / "dcp.json").read_text())
    metadata_from_json(json.loads(json.dumps(obj)))  # as written: accepted
    _JSON_EDITS[edit](obj)
    with pytest.raises(MetadataError):
        metadata_from_json(obj)


def _repoint_storage(path: Path, target: str, legacy: bool) -> None:
    from kdcore.storage.safe_dcp import read_metadata

    if legacy:
        md = read_metadata(path)
        for info in md.storage_data.values():
            info.relative_path = target  # a REDUCE of an allowed class with a hostile argument
        (path / ".metadata").write_bytes(pickle.dumps(md))
        (path / "dcp.json").unlink()
    else:
        obj = json.loads((path / "dcp.json").read_text())
        for entry in obj["storage"]:
            entry["file"] = target
        (path / "dcp.json").write_text(json.dumps(obj))
    (path / "__0_0.distcp").unlink()
    _rewrite_manifest(path, legacy=legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["json", "pickled"])
def test_a_storage_path_outside_the_folder_is_refused(work, legacy):
    ckpts = work / "ckpts"
    model, proj, opt, sched = trained_setup(steps=1)
    expected = snapshot(model, proj, opt)
    ck.save_checkpoint(ckpts, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    newest = _save(ckpts, 2, seed=3)
    (work / "x.distcp").write_bytes((newest / "__0_0.distcp").read_bytes())  # other weights, outside
    _repoint_storage(newest, "../../x.distcp", legacy)
    warnings: list[str] = []
    m, p, o, s = _fresh()
    state = ck.load_latest(ckpts, model=m, optimizer=o, scheduler=s, extra_modules=[p], warn=warnings.append)
    assert state.step == 1
    assert_same(snapshot(m, p, o), expected)  # the weights outside were not read
    assert len(warnings) == 1 and "'../../x.distcp' is not a shard file inside the checkpoint folder" in warnings[0]


def test_truncated_newest_checkpoint_falls_back_to_an_older_one(work):
    _save(work, 1, steps=1)
    model, proj, opt, sched = trained_setup(steps=1)
    expected = snapshot(model, proj, opt)
    ck.save_checkpoint(work, 2, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    ck.save_checkpoint(work, 3, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj], keep=3)
    shard = work / "step_3" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated newest
    flipped = work / "step_2" / "trainer_state.json"
    text = flipped.read_text()
    flipped.write_text(text.replace('"step": 2', '"step": 7'))  # same size, other bytes
    warnings: list[str] = []
    m, p, o, s = _fresh()
    state = ck.load_latest(work, model=m, optimizer=o, scheduler=s, extra_modules=[p], warn=warnings.append)
    assert state.step == 1 and state.path == work / "step_1"
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "step_3" in warnings[0] and "truncated" in warnings[0]
    assert "step_2" in warnings[1] and "sha256" in warnings[1]
    assert snapshot(m, p, o)[0].keys() == expected[0].keys()
    (work / "step_1" / "__0_0.distcp").unlink()
    with pytest.raises(ck.CheckpointError, match="all 3 are damaged"):
        _load_latest(work, [])


def _layers_setup(layers: int):
    model = tiny_llama(num_hidden_layers=layers)
    shard_student(model, "fp32")
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    opt = build_optimizer(model, 1e-2, 0.01, [proj])
    return model, proj, opt, build_scheduler(opt, 1, 10, 0.1)


def test_a_checkpoint_of_another_depth_never_loads_partially(work):
    model, proj, opt, sched = _layers_setup(4)
    path = ck.save_checkpoint(work, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    m, p, o, s = _layers_setup(2)
    before = {n: t.detach().clone() for n, t in m.named_parameters()}
    with pytest.raises(ck.CheckpointError, match="unexpected") as err:
        ck.load_checkpoint(path, model=m, optimizer=o, scheduler=s, extra_modules=[p])
    assert "layers.2" in str(err.value) and "missing" not in str(err.value)
    assert all(torch.equal(before[n], t) for n, t in m.named_parameters())  # nothing was loaded

    model2, proj2, opt2, sched2 = _layers_setup(2)
    path2 = ck.save_checkpoint(work / "two", 1, model=model2, optimizer=opt2, scheduler=sched2, extra_modules=[proj2])
    m4, p4, o4, s4 = _layers_setup(4)
    with pytest.raises(ck.CheckpointError, match="missing.*layers.2"):
        ck.load_checkpoint(path2, model=m4, optimizer=o4, scheduler=s4, extra_modules=[p4])


def test_a_save_that_hits_enospc_removes_its_partial_folder_and_keeps_the_last_good(work, monkeypatch):
    _save(work, 1)

    def full_disk(path, world):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ck, "_write_rng_file", full_disk)
    with pytest.raises(ck.CheckpointError, match="No space left on device") as err:
        _save(work, 2)
    msg = str(err.value)
    assert "\n" not in msg and "step_2" in msg and "step_1" in msg and "kept" in msg
    assert not (work / "step_2.tmp").exists() and not (work / "step_2").exists()
    assert ck.find_latest(work) == work / "step_1" and ck.verify_checkpoint(work / "step_1") is None


def test_a_save_onto_a_full_tmpfs_fails_cleanly(work):
    probe = _save(work / "probe", 1)
    one = sum(f.stat().st_size for f in probe.iterdir())
    mnt = work / "small"
    mnt.mkdir()
    # room for one checkpoint and a half: the second save runs out of space mid-write
    size_kb = (one * 3 // 2) // 1024 + 8
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        _save(mnt, 1)
        with pytest.raises(ck.CheckpointError, match="No space left on device") as err:
            _save(mnt, 2, keep=2)
        assert "\n" not in str(err.value)
        assert not (mnt / "step_2.tmp").exists() and not (mnt / "step_2").exists()
        assert ck.find_latest(mnt) == mnt / "step_1" and ck.verify_checkpoint(mnt / "step_1") is None
        assert _load_latest(mnt).step == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@contextlib.contextmanager
def _tmpfs(where: Path, size_bytes: int):
    """A real filesystem of ``size_bytes`` (we run as root in CI); skipped, saying why, where
    mounting is not permitted."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024 + 4}k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_an_export_onto_a_full_tmpfs_fails_cleanly_and_keeps_the_previous_one(work):
    model, *_ = trained_setup(steps=1)
    probe = ck.export_hf(model, None, work / "probe")
    one = sum(f.stat().st_size for f in probe.iterdir())
    with _tmpfs(work / "small", one * 3 // 2) as mnt:  # room for one export and a half
        ck.export_hf(model, None, mnt / "hf")
        before = {f.name: f.read_bytes() for f in (mnt / "hf").iterdir()}
        with pytest.raises(ck.CheckpointError, match="No space left on device") as err:
            ck.export_hf(model, None, mnt / "hf")
        msg = str(err.value)
        assert "\n" not in msg and "hf.tmp" in msg and "previous 'hf' is kept" in msg
        assert not (mnt / "hf.tmp").exists()
        assert {f.name: f.read_bytes() for f in (mnt / "hf").iterdir()} == before
        assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize > one // 3


class _Builds:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_the_metadata_unpickler_builds_only_plain_data(work):
    import io

    import torch.distributed.checkpoint as dcp

    from kdcore.storage.safe_dcp import safe_load_metadata

    for bait in (_Builds(dcp.FileSystemWriter, str(work / "made")), _Builds(os.system, "true"),
                 _Builds(getattr, "text", "upper"), _Builds(torch.serialization.load, "x")):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            safe_load_metadata(io.BytesIO(pickle.dumps(bait)))
    assert not (work / "made").exists()
    path = _save(work, 1)  # and a real (older kdflow's) checkpoint's metadata reads back whole
    _as_legacy(path)
    with open(path / ".metadata", "rb") as f:
        meta = safe_load_metadata(f)
    assert any(k.startswith("model.") for k in meta.state_dict_metadata)


# ---------------------------------------------------------------------------------------------
# every file verified, every value checked, before any of it is used


def _edit_json(name: str, **changes):
    def edit(path: Path) -> None:
        obj = json.loads((path / name).read_text())
        obj.update(changes)
        (path / name).write_text(json.dumps(obj))
    return edit


_RECIPE = {"train": {"max_steps": 10, "seed": 0}}
_DAMAGE = {
    "recipe_cut_in_half": (_cut_recipe, "recipe.json"),
    "meta_world_size_0": (_edit_json("meta.json", world_size=0), "world_size is 0"),
    "meta_world_size_text": (_edit_json("meta.json", world_size="1"), "world_size is '1'"),
    "meta_step_negative": (_edit_json("meta.json", step=-1), "step is -1"),
    "state_step_10e18": (_edit_json("trainer_state.json", step=10**18), "step is 1000000000000000000"),
    "state_step_other": (_edit_json("trainer_state.json", step=7), "step is 7, but meta.json says 2"),
    "state_data_state_list": (_edit_json("trainer_state.json", data_state=[1]), "data_state is not a mapping"),
    "beyond_planned_steps": (_edit_json("recipe.json", train={"max_steps": 0}), "beyond the run's planned"),
    "recipe_not_a_mapping": (lambda p: (p / "recipe.json").write_text("[1, 2]"), "not a recipe mapping"),
}


@pytest.mark.parametrize("rewrite", [False, True], ids=["as_damaged", "manifest_rewritten"])
@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_a_damaged_value_falls_back_to_the_newest_good_checkpoint(work, damage, rewrite):
    from kdcore.storage.run_folder import saved_run_recipe

    ckpts = work / "checkpoints"
    _save(ckpts, 1, recipe=_RECIPE)
    newest = _save(ckpts, 2, recipe=_RECIPE)
    fn, phrase = _DAMAGE[damage]
    fn(newest)
    if rewrite:
        _rewrite_manifest(newest)
    # the recipe a --resume compares against comes from the checkpoint it will load, not the damaged one
    assert saved_run_recipe(work) == (_RECIPE, str(ckpts / "step_1"))
    warnings: list[str] = []
    state = _load_latest(ckpts, warnings)
    assert state.step == 1 and state.recipe == _RECIPE
    assert len(warnings) == 1 and "\n" not in warnings[0] and "step_2" in warnings[0]
    if rewrite:  # the value checks catch what the (unsigned) manifest cannot
        assert phrase in warnings[0], warnings[0]
    else:
        assert "sha256" in warnings[0] or "truncated" in warnings[0], warnings[0]
    m, p, o, s = _fresh()
    with pytest.raises(ck.CorruptCheckpointError):
        ck.load_checkpoint(newest, model=m, optimizer=o, scheduler=s, extra_modules=[p])
    # no good checkpoint left: one line, no JSONDecodeError or ZeroDivisionError
    fn(ckpts / "step_1")
    if rewrite:
        _rewrite_manifest(ckpts / "step_1")
    with pytest.raises(ck.CheckpointError, match="no usable checkpoint .* all 2 are damaged") as err:
        _load_latest(ckpts, [])
    assert "\n" not in str(err.value)


def test_a_manifest_naming_files_outside_or_missing_the_state_is_refused(work):
    path = _save(work, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "names '../../etc/passwd', not a file of the checkpoint folder" in ck.verify_checkpoint(path)
    del manifest["files"]["../../etc/passwd"]
    del manifest["files"]["meta.json"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    problem = ck.verify_checkpoint(path)
    assert "meta.json" in problem and "does not list" in problem
    (path / "manifest.json").write_text("{}")
    assert ck.verify_checkpoint(path) == "manifest.json lists no files"


def test_an_ema_average_is_written_before_the_folder_is_sealed(work):
    from safetensors.torch import save_file

    path = _save(work, 1, write_extra=lambda d: save_file({"w": torch.ones(2)}, str(d / "ema_teacher.safetensors")))
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert "ema_teacher.safetensors" in files and "meta.json" in files
    (path / "ema_teacher.safetensors").write_bytes(b"x" * files["ema_teacher.safetensors"]["size"])
    assert "ema_teacher.safetensors does not match the sha256" in ck.verify_checkpoint(path)


class _Rollout:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _checkpointer(work, max_steps, latest=None):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kdcore.training.checkpointing import Checkpointer
    from kdcore.training.types import LatestEval

    model, proj, opt, sched = trained_setup(steps=1)
    recipe = OmegaConf.create({"train": {"max_steps": max_steps, "lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 0.1},
                               "checkpoint": {"every": 2, "keep": 2}})
    student = SimpleNamespace(model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    log = SimpleNamespace(is_main=False, path=work / "metrics.jsonl", say=lambda line: None)
    return Checkpointer(work, cfg=recipe, student=student, rollout=_Rollout(), latest_eval=latest or LatestEval(),
                        log=log)


def test_the_checkpointer_keeps_the_evaluated_step_and_checks_its_own_values(work):
    from kdcore.data import DataPosition
    from kdcore.training.types import LatestEval, TrainingError

    saver = _checkpointer(work, 4, LatestEval(record={"step": 4, "eval_kd": 0.5}, loss=0.5))
    path = saver.save(4, DataPosition(epoch=0, step=4))
    restored = _checkpointer(work, 4)
    assert restored.restore()[0] == 4
    # the final evaluation was logged before this checkpoint: a resume does not log it again
    assert restored.evaluated_step == 4 and restored.latest_eval.loss == 0.5
    with pytest.raises(TrainingError, match="at step 4, beyond train.max_steps 3"):
        _checkpointer(work, 3).restore()  # would train nothing and export the old weights
    _edit_json("trainer_state.json", data_state={"epoch": -1, "step": 4})(path)
    _rewrite_manifest(path)
    with pytest.raises(ck.CheckpointError, match="all 1 are damaged"):
        _checkpointer(work, 4).restore()


# ---------------------------------------------------------------------------------------------
# the same through `kdcore train` (the issue's cases, as a user meets them)


def _crash_logs(out: Path) -> list[Path]:
    return list(out.glob("kdcore-crash-*.log"))


@pytest.mark.long  # five runs; the parts are covered fast above
def test_resume_from_the_cli_falls_back_and_logs_the_final_eval_once(tmp_path, tiny_teacher):
    from helpers.train import evals, run_train, train_steps, write_recipe

    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 4, "eval_every": 2},
                          checkpoint={"every": 2, "keep": 3, "export_hf": False})
    out = tmp_path / "out"
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["step"] for e in evals(out)] == [0, 2, 4]
    # as after a kill during the final export: the last checkpoint and the final eval are written
    res = run_train(recipe, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["step"] for e in evals(out)] == [0, 2, 4]  # logged once, not again on resume

    newest = out / "checkpoints" / "step_4"
    _cut_recipe(newest)
    _rewrite_manifest(newest)
    res = run_train(recipe, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping checkpoint '{newest}'" in res.stderr and "recipe.json" in res.stderr
    assert "JSONDecodeError" not in res.stderr or "is unreadable" in res.stderr
    assert [r["step"] for r in train_steps(out)] == [1, 2, 3, 4]  # steps 3 and 4 re-run from step_2
    assert [e["step"] for e in evals(out)] == [0, 2, 4]

    for path in (out / "checkpoints").glob("step_*"):
        _edit_json("meta.json", world_size=0)(path)
        _rewrite_manifest(path)
    res = run_train(recipe, resume=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and lines[-1].startswith("kdcore: error: ") and "no usable checkpoint" in lines[-1]
    assert "ZeroDivisionError" not in res.stderr and not _crash_logs(out)


@pytest.mark.long
def test_disk_full_in_a_save_and_in_the_export_from_the_cli(tmp_path, tiny_teacher):
    from helpers.train import run_train, write_recipe

    probe = write_recipe(tmp_path / "probe", tiny_teacher, train={"max_steps": 1},
                         checkpoint={"every": 1, "keep": 1, "export_hf": True})
    res = run_train(probe)
    assert res.returncode == 0, res.stderr[-3000:]
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    one_ckpt, export = size(tmp_path / "probe" / "out" / "checkpoints"), size(tmp_path / "probe" / "out" / "hf")

    with _tmpfs(tmp_path / "full_save", one_ckpt * 3 // 2 + (256 << 10)) as mnt:  # a save and a half
        recipe = write_recipe(tmp_path / "a", tiny_teacher, train={"max_steps": 3, "output_dir": str(mnt / "out")},
                              checkpoint={"every": 1, "keep": 1, "export_hf": False})
        res = run_train(recipe)
        line = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 1, res.stderr[-3000:]
        assert line.startswith("kdcore: error: saving checkpoint step_2") and "No space left on device" in line
        assert "removed the partial step_2.tmp" in line and "step_1' is kept" in line
        ckpts = mnt / "out" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1"]
        assert (ckpts / "latest").read_text().strip() == "step_1" and not _crash_logs(mnt / "out")

    with _tmpfs(tmp_path / "full_export", one_ckpt + export // 2 + (256 << 10)) as mnt:  # no room for the export
        recipe = write_recipe(tmp_path / "b", tiny_teacher, train={"max_steps": 1, "output_dir": str(mnt / "out")},
                              checkpoint={"every": 0, "keep": 1, "export_hf": True})
        res = run_train(recipe)
        line = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 1, res.stderr[-3000:]
        assert line.startswith("kdcore: error: writing '") and "No space left on device" in line, line
        assert "removed the partial hf.tmp" in line
        assert not (mnt / "out" / "hf.tmp").exists() and not (mnt / "out" / "hf").exists()
        assert (mnt / "out" / "checkpoints" / "latest").read_text().strip() == "step_1"
        assert not _crash_logs(mnt / "out")


def test_a_save_failing_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """Two ranks (torchrun, gloo): step 2's save fails on rank 1, step 3's on rank 0 (sealing);
    every rank gets one line naming the failing rank and the cause, promptly, `latest` untouched."""
    import json
    import subprocess
    import sys

    from helpers.assets import DIST_SCRIPTS, ROOT

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(DIST_SCRIPTS / "save_fails_on_one_rank.py"), str(tmp_path), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for step, bad in (("2", 1), ("3", 0)):
            msg = res[step]["error"]
            assert msg is not None and "\n" not in msg, (rank, step, msg)
            assert f"saving checkpoint step_{step}" in msg and f"failed on rank {bad}: " in msg, msg
            assert "No space left on device" in msg and "step_1' is kept" in msg, msg
            assert f"removed the partial step_{step}.tmp" in msg and not res[step]["partial_left"], (rank, res)
            assert res[step]["latest"] == "step_1" and res[step]["folders"] == ["latest", "step_1"], res
