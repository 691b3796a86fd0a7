"""Experiment trackers as plugins (``register_loggers``): what every logger receives, what a
failing one costs, and what the built-in TensorBoard and W&B loggers write, read back with the
trackers' own formats."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import io
import json
import struct
import types
from pathlib import Path

import pytest

import kdcore
from kdcore import hookimpl
from kdcore.plugin_system.registry import PluginError
from helpers.train import records, write_recipe

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
TRACKERS = [n for n, have in (("tensorboard", HAVE_TENSORBOARD), ("wandb", HAVE_WANDB)) if have]
MAX_STEPS, EVAL_EVERY = 4, 2


class Collector:
    """Keeps what the core hands a logger, in memory."""

    def __init__(self, run_dir, config):
        self.run_dir, self.config, self.records, self.closed = run_dir, config, [], 0

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed += 1


class BreaksAtStep2(Collector):
    def log(self, record):
        if record["step"] == 2:
            raise RuntimeError("tracker [server] unreachable\nsecond line")
        super().log(record)


def make_plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_teacher):
    """One tiny in-process run with a collecting plugin logger, one that breaks, and the
    installed built-in trackers (the teacher runs in a spawned process, as in `kdcore train`)."""
    import torch

    from kdcore.infra import distributed as kdist
    from kdcore.training import train

    made: dict[str, Collector] = {}

    def register_loggers(register):
        register("collect", lambda *, run_dir, config: made.setdefault("collect", Collector(run_dir, config)))
        register("breaks", lambda *, run_dir, config: made.setdefault("breaks", BreaksAtStep2(run_dir, config)))

    tmp = tmp_path_factory.mktemp("tracked")
    recipe = write_recipe(tmp, tiny_teacher, train={"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY},
                          checkpoint={"export_hf": False},
                          logging={"backends": ["collect", "breaks", *TRACKERS, "jsonl"]})
    kdcore.register_plugin(make_plugin(register_loggers=register_loggers), "test-loggers")
    stderr = io.StringIO()
    threads = torch.get_num_threads()
    try:
        cfg = kdcore.load_recipe(str(recipe))
        with contextlib.redirect_stderr(stderr):
            result = train(cfg)
    finally:
        kdcore.unregister_plugin("test-loggers")
        kdist.teardown()  # what `kdcore train` does after a run: later tests find no process group of ours
        torch.set_num_threads(threads)
    return types.SimpleNamespace(out=Path(result.output_dir), made=made, stderr=stderr.getvalue(), result=result)


def test_a_plugin_logger_receives_every_record_and_the_config(tracked_run):
    collect = tracked_run.made["collect"]
    written = records(tracked_run.out)
    assert collect.records == written  # the same dicts as metrics.jsonl, in order
    assert [r["step"] for r in written if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert [r["step"] for r in written if "eval_teacher_kl" in r] == [0, 2, 4]
    assert collect.run_dir == tracked_run.out
    assert collect.config["train"]["max_steps"] == MAX_STEPS
    assert collect.config["logging"]["backends"][:2] == ["collect", "breaks"]
    assert isinstance(collect.config["train"], dict)  # a plain dict, not an OmegaConf node
    assert collect.closed == 1


def test_a_failing_logger_is_named_once_and_the_run_goes_on(tracked_run):
    assert tracked_run.result.steps == MAX_STEPS
    warnings = [line for line in tracked_run.stderr.splitlines() if "logger 'breaks' failed" in line]
    assert warnings == ["logger 'breaks' failed: RuntimeError: tracker [server] unreachable second line; "
                        "disabled, the run goes on"]
    breaks = tracked_run.made["breaks"]
    assert [r["step"] for r in breaks.records] == [0, 1]  # nothing after the failure
    assert breaks.closed == 1  # closed quietly when disabled, so it can let go of what it holds
    assert len(records(tracked_run.out)) == MAX_STEPS + 3  # metrics.jsonl complete: 4 steps, 3 evaluations


def by_step(key: str, recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r[key] for r in recs if key in r}


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="tensorboard not installed (pip install 'kdflow[tensorboard]')")
def test_tensorboard_event_files_hold_the_scalars_and_the_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tracked_run.out / "tensorboard"
    assert glob.glob(str(folder / "events.out.tfevents.*"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    written = records(tracked_run.out)
    for key in ("loss", "kd_loss", "lr", "eval_teacher_kl"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = by_step(key, written)
        assert got.keys() == want.keys(), key
        assert all(got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-12) for s in want), key  # stored as float32
    assert "step" not in acc.Tags()["scalars"]
    (text,) = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    shown = acc.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in shown.splitlines())) == tracked_run.made["collect"].config


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB-log framing
    (32 KiB blocks; each chunk: crc32c, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, payload, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block too short for a header, or zero padding
            pos += left
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            out.append(record)
            payload = b""
    return out


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install 'kdflow[wandb]')")
def test_wandb_offline_run_holds_the_history_and_the_config(tracked_run):
    (run_dir,) = glob.glob(str(tracked_run.out / "wandb" / "offline-run-*"))
    (wandb_file,) = glob.glob(f"{run_dir}/run-*.wandb")
    recs = wandb_records(Path(wandb_file))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    written = records(tracked_run.out)
    for key in ("loss", "ce_loss", "eval_teacher_kl"):
        assert by_step(key, [h for h in history if key in h]) == pytest.approx(by_step(key, written)), key
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    assert {k: v for k, v in config.items() if k != "_wandb"} == tracked_run.made["collect"].config
    assert [r for r in recs if r.WhichOneof("record_type") == "exit"], "the run was not finished"


def test_a_misspelled_backend_gets_a_did_you_mean_at_validation(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, logging={"backends": ["tensorbord", 3]})
    with pytest.raises(kdcore.RecipeError) as err:
        kdcore.load_recipe(str(recipe))
    text = str(err.value)
    assert "logging.backends: unknown logger 'tensorbord' (did you mean 'tensorboard'?)" in text
    assert "logging.backends[1]: expected a logger name, got int 3" in text


def test_the_default_recipe_has_no_trackers_and_jsonl_is_the_run_s_own(tmp_path, tiny_teacher):
    cfg = kdcore.load_recipe(str(write_recipe(tmp_path, tiny_teacher)))
    assert list(cfg.logging.backends) == []
    reg = kdcore.load_registry()
    assert {"tensorboard", "wandb"} <= set(reg.names("logger"))
    assert all(reg.get("logger", n).plugin == "kdflow" for n in ("tensorboard", "wandb"))
    # metrics.jsonl is written by RunLog itself, not by a registered factory nobody calls
    assert "jsonl" not in reg.names("logger")
    listed = kdcore.load_recipe(str(write_recipe(tmp_path / "listed", tiny_teacher, logging={"backends": ["jsonl"]})))
    assert list(listed.logging.backends) == ["jsonl"]  # naming it stays valid (and changes nothing)


def test_a_plugin_logger_named_jsonl_is_refused():
    # build_loggers skips the name (RunLog writes metrics.jsonl itself): such a logger would be
    # registered, listed and never called
    def register_loggers(register):
        register("jsonl", Collector)

    kdcore.register_plugin(make_plugin(register_loggers=register_loggers), "test-logger-jsonl")
    try:
        with pytest.raises(PluginError, match="logger name 'jsonl' is reserved for the run's own metrics.jsonl"):
            kdcore.load_registry()
    finally:
        kdcore.unregister_plugin("test-logger-jsonl")


def test_trackers_fail_at_start_or_close_with_one_line_and_jsonl_stays(tmp_path, capsys):
    from kdcore.training.metrics import RunLog

    class ClosesBadly(Collector):
        def close(self):
            raise OSError("disk gone")

    def refuses(*, run_dir, config):
        raise ImportError("no module named x")

    def register_loggers(register):
        register("refuses", refuses)
        register("closes_badly", lambda *, run_dir, config: ClosesBadly(run_dir, config))

    kdcore.register_plugin(make_plugin(register_loggers=register_loggers), "test-bad-loggers")
    try:
        log = RunLog(tmp_path / "metrics.jsonl", is_main=True, progress=False)
        log.open_loggers(kdcore.load_registry(), ["refuses", "closes_badly"], config={})
        assert [name for name, _ in log.loggers] == ["jsonl", "closes_badly"]
        log.record({"step": 1, "loss": 0.5})
        log.close()
        log.close()  # a second close (Trainer.close after a failure) does nothing
    finally:
        kdcore.unregister_plugin("test-bad-loggers")
    err = capsys.readouterr().err.splitlines()
    assert err == ["logger 'refuses' failed: ImportError: no module named x; disabled, the run goes on",
                   "logger 'closes_badly' failed to close: OSError: disk gone; the others were closed"]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1, "loss": 0.5}]


def test_other_ranks_build_no_loggers(tmp_path):
    from kdcore.training.metrics import RunLog

    log = RunLog(tmp_path / "metrics.jsonl", is_main=False, progress=False)
    log.open_loggers(kdcore.load_registry(), ["tensorboard", "wandb"], config={})
    log.record({"step": 1, "loss": 0.5})
    log.close()
    assert log.loggers == [] and list(tmp_path.iterdir()) == []


def test_a_logger_with_an_options_dataclass_is_refused():
    @dataclasses.dataclass
    class Opts:
        project: str = "x"

    def register_loggers(register):
        register("with_options", Collector, options=Opts)

    kdcore.register_plugin(make_plugin(register_loggers=register_loggers), "test-logger-options")
    try:
        with pytest.raises(PluginError, match="logger 'with_options' takes no options"):
            kdcore.load_registry()
    finally:
        kdcore.unregister_plugin("test-logger-options")
