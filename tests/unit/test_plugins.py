"""The plugin manager's rules, each with in-process plugins or real entry points."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import types

import pytest

import kdcore
from kdcore import hookimpl
from kdcore.plugin_system.manager import make_plugin_manager
from kdcore.plugin_system.registry import PluginError, UnknownAlgorithmError


def make_plugin(**hooks) -> types.SimpleNamespace:
    """A plugin object whose attributes are hookimpl-marked functions."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


@dataclasses.dataclass
class ScaleOptions:
    scale: float = 2.0  # test option


def scaled_l1(student_logits, teacher_logits, *, temperature, scale=2.0):
    """Scaled L1 between logits, for tests."""
    return scale * (student_logits - teacher_logits).abs().sum(-1)


def test_in_process_plugin_registers_and_unregisters():
    def register_losses(register):
        register("scaled_l1", scaled_l1, options=ScaleOptions)

    kdcore.register_plugin(make_plugin(register_losses=register_losses), "test-scaled")
    try:
        entry = kdcore.load_registry().get("loss", "scaled_l1")
        assert entry.fn is scaled_l1
        assert entry.kind == "loss" and entry.plugin == "test-scaled"
        assert entry.summary == "Scaled L1 between logits, for tests."
        assert entry.option_fields() == {"scale": 2.0}
        assert entry.make_options({"scale": 3.0}) == ScaleOptions(3.0)
    finally:
        kdcore.unregister_plugin("test-scaled")
    with pytest.raises(UnknownAlgorithmError):
        kdcore.load_registry().get("loss", "scaled_l1")


def test_factory_builds_a_fresh_manager_each_call():
    pm1, _ = make_plugin_manager()
    pm2, _ = make_plugin_manager()
    assert pm1 is not pm2


def test_missing_docstring_gives_undocumented():
    def register_rollouts(register):
        register("silent", lambda options=None: None)

    kdcore.register_plugin(make_plugin(register_rollouts=register_rollouts), "test-silent")
    try:
        assert kdcore.load_registry().get("rollout", "silent").summary == "Undocumented"
    finally:
        kdcore.unregister_plugin("test-silent")


def test_hookimpl_matching_no_hookspec_names_the_plugin():
    def register_loss(register):  # misspelled: the hook is register_losses
        pass

    kdcore.register_plugin(make_plugin(register_loss=register_loss), "test-typo")
    try:
        with pytest.raises(PluginError, match="test-typo") as err:
            kdcore.load_registry()
        assert "register_loss" in str(err.value)
    finally:
        kdcore.unregister_plugin("test-typo")


def test_duplicate_name_loads_for_listing_and_refuses_only_where_used(capsys):
    from kdcore.commands.cli import main

    def one(register):
        register("twin", scaled_l1)

    def two(register):
        register("twin", scaled_l1)
        register("single", scaled_l1)

    kdcore.register_plugin(make_plugin(register_losses=one), "test-first")
    kdcore.register_plugin(make_plugin(register_losses=two), "test-second")
    try:
        registry = kdcore.load_registry()  # still loads: `kdcore plugins` must be able to show the clash
        assert registry.duplicates == {("loss", "twin"): ["test-first", "test-second"]}
        assert registry.get("loss", "single").plugin == "test-second"
        with pytest.raises(PluginError, match="twin") as err:
            registry.get("loss", "twin")
        assert "test-first" in str(err.value) and "test-second" in str(err.value)
        for argv in (["plugins"], ["list-algorithms", "--kind", "loss"]):
            capsys.readouterr()
            assert main(argv) == 0
            warn = [line for line in capsys.readouterr().err.splitlines() if "twin" in line]
            assert len(warn) == 1 and warn[0].startswith("kdcore: warning:")
            assert "test-first" in warn[0] and "test-second" in warn[0]
        assert main(["validate", "quickstart", "distill.loss=twin"]) == 2
        err_text = capsys.readouterr().err
        assert "distill.loss" in err_text and "test-first" in err_text and "test-second" in err_text
        assert main(["validate", "quickstart"]) == 0  # a recipe that does not use the name is fine
    finally:
        kdcore.unregister_plugin("test-first")
        kdcore.unregister_plugin("test-second")


def test_same_name_in_different_kinds_is_fine():
    def losses(register):
        register("shared_name", scaled_l1)

    def rollouts(register):
        register("shared_name", lambda options=None: None)

    kdcore.register_plugin(make_plugin(register_losses=losses, register_rollouts=rollouts), "test-kinds")
    try:
        reg = kdcore.load_registry()
        assert reg.get("loss", "shared_name").kind == "loss"
        assert reg.get("rollout", "shared_name").kind == "rollout"
    finally:
        kdcore.unregister_plugin("test-kinds")


@pytest.mark.parametrize("name,fn,options,match", [
    ("Bad-Name", scaled_l1, None, "must match"),
    ("not_callable", 42, None, "not callable"),
    ("bad_options", scaled_l1, dict, "dataclass"),
])
def test_bad_registrations_are_rejected_with_the_plugin_named(name, fn, options, match):
    def register_losses(register):
        register(name, fn, options=options)

    kdcore.register_plugin(make_plugin(register_losses=register_losses), "test-bad")
    try:
        with pytest.raises(PluginError, match=match) as err:
            kdcore.load_registry()
        assert "test-bad" in str(err.value)
    finally:
        kdcore.unregister_plugin("test-bad")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownAlgorithmError) as err:
        kdcore.load_registry().get("rollout", "of_policy")
    assert "off_policy" in str(err.value) and "did you mean" in str(err.value)


class FakeDist:
    def __init__(self, name, version="9.9"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for an installed distribution's entry point (only load() differs)."""

    def __init__(self, name, dist, target):
        self.name, self.dist, self._target = name, FakeDist(dist), target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def _with_fake_entry_points(monkeypatch, fakes):
    real = md.entry_points

    def entry_points(group=None, **kw):
        eps = list(real(group=group, **kw)) if group else []
        return eps + fakes if group == "kdcore" else real(group=group, **kw)

    monkeypatch.setattr(md, "entry_points", entry_points)


def test_plugin_that_fails_to_import_is_reported_and_others_load(monkeypatch):
    def register_losses(register):
        register("healthy_loss", scaled_l1)

    _with_fake_entry_points(monkeypatch, [
        FakeEntryPoint("broken", "kdflow-plugin-broken", ImportError("no module named torch_foo")),
        FakeEntryPoint("healthy", "kdflow-plugin-healthy", make_plugin(register_losses=register_losses)),
    ])
    reg = kdcore.load_registry()
    failed = {p.distribution: p.error for p in reg.failed_plugins()}
    assert "kdflow-plugin-broken" in failed and "torch_foo" in failed["kdflow-plugin-broken"]
    assert reg.get("loss", "healthy_loss").plugin == "kdflow-plugin-healthy"
    assert reg.get("loss", "healthy_loss").version == "9.9"
    assert "off_policy" in reg.names("rollout")  # built-ins unaffected


def test_allow_list_limits_external_plugins_but_keeps_builtins(monkeypatch):
    def make(name):
        def register_losses(register):
            register(name, scaled_l1)
        return make_plugin(register_losses=register_losses)

    _with_fake_entry_points(monkeypatch, [
        FakeEntryPoint("a", "kdflow-plugin-a", make("loss_a")),
        FakeEntryPoint("b", "kdflow-plugin-b", make("loss_b")),
    ])
    monkeypatch.setenv("KDCORE_LOAD_PLUGINS", "kdflow-plugin-b")
    reg = kdcore.load_registry()
    assert "loss_b" in reg.names("loss") and "loss_a" not in reg.names("loss")
    assert "off_policy" in reg.names("rollout")
    assert "ab_div" not in reg.names("loss")  # the installed example plugin is external too
    monkeypatch.setenv("KDCORE_LOAD_PLUGINS", "")
    reg = kdcore.load_registry()
    assert not {"loss_a", "loss_b", "ab_div"} & set(reg.names("loss"))
    assert reg.names("rollout")


def test_example_plugin_is_discovered_through_entry_points():
    reg = kdcore.load_registry()
    entry = reg.get("loss", "ab_div")
    assert entry.plugin == "kdflow-plugin-example"
    assert entry.version == md.version("kdflow-plugin-example")
    assert set(entry.option_fields()) == {"alpha", "beta"}
    plugin = next(p for p in reg.plugins if p.distribution == "kdflow-plugin-example")
    assert plugin.hooks == ("register_losses",) and not plugin.builtin


def test_builtins_come_through_the_entry_point_group():
    builtin_eps = [ep for ep in md.entry_points(group="kdcore") if ep.dist and ep.dist.name == "kdflow"]
    # the zoo, plus the built-in engines (core, not algorithms) through the same group
    assert {ep.value.split(".")[0] for ep in builtin_eps if ep.name != "engines"} == {"kdflow_algorithms"}
    assert [ep.value for ep in builtin_eps if ep.name == "engines"] == ["kdcore.engines.builtin"]
    reg = kdcore.load_registry()
    assert all(p.error is None for p in reg.plugins if p.builtin), reg.failed_plugins()
    assert {"hf", "sglang"} <= set(reg.names("engine"))
    for kind in ("loss", "aligner", "rollout", "engine", "evaluator", "logger"):
        assert any(e.plugin == "kdflow" for e in reg.list(kind)), kind


def test_import_kdcore_is_light():
    import subprocess
    import sys

    code = "import kdcore, sys; bad = [m for m in ('torch', 'sglang', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_in_process_aligner_and_rollout_can_be_chosen_in_a_recipe():
    from kdcore.distill.aligner import Aligner
    from kdcore.recipe.loading import validate_raw
    from kdcore.training.rollout_policy import RolloutPolicy

    @dataclasses.dataclass
    class WindowOptions:
        window: int = 2  # test option

    class EveryOther(RolloutPolicy):
        def select(self, batch, ctx):
            return batch[::2]

    def register_aligners(register):
        register("window_aligner", lambda **kw: Aligner(), options=WindowOptions, summary="Test aligner.")

    def register_rollouts(register):
        register("every_other", lambda options=None: EveryOther())

    kdcore.register_plugin(make_plugin(register_aligners=register_aligners, register_rollouts=register_rollouts),
                           "test-align-roll")
    try:
        reg = kdcore.load_registry()
        assert reg.get("aligner", "window_aligner").summary == "Test aligner."
        policy = reg.get("rollout", "every_other").fn(None)
        assert policy.select([1, 2, 3], None) == [1, 3]
        raw = {"teacher": {"path": "m"}, "data": {"train": "x"},
               "distill": {"aligner": "window_aligner", "aligner_options": {"window": "wide"},
                           "rollout": "every_other"}}
        errors = validate_raw(raw, reg)
        assert "distill.aligner_options.window: expected int, got str 'wide'" in errors
        assert not any("unknown aligner" in e or "unknown rollout" in e for e in errors)
    finally:
        kdcore.unregister_plugin("test-align-roll")


# ------------------------------------------------------------------------- register_engines


class FakeTeacher:
    """A teacher engine built on the protocol alone: hidden row = [token id, position, 1, ...]."""

    @staticmethod
    def build(teacher_cfg, *, max_rows, threads, micro_batches_per_step):
        import torch

        from kdcore.infra.channel import Channel
        from kdcore.engines.protocol import TeacherEngine

        class Engine(TeacherEngine):
            hidden_size, vocab_size = 4, 100

            def __init__(self):
                self.max_rows, self.n_slots = max_rows, max(2, micro_batches_per_step)
                self.colocated = True  # the flag the trainer reads (never the engine name)
                self.threads, self.path = threads, teacher_cfg.path
                self._init_tickets()

            def start(self):
                self.channel = Channel(self.max_rows, self.hidden_size, n_slots=self.n_slots)
                self.channel.attach_producer()
                self.channel.attach_consumer()
                return self

            def close(self):
                pass

            def submit(self, request):
                self._check_capacity()
                request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
                ticket = self._new_ticket(request)
                buf = self.channel.acquire_write(ticket.seq)
                rows = [[float(request.input_ids[b, p]), float(p), 1.0, 1.0]
                        for b, pos in enumerate(request.positions) for p in pos]
                buf[:len(rows)] = torch.tensor(rows).reshape(-1, 4)
                self.channel.commit(ticket.seq, len(rows))
                return self._track(ticket)

            def result(self, ticket, timeout=None):
                return self._ticket_view(ticket, lambda: self.channel.wait_full(ticket.seq, progress_timeout=5))

            def release(self, ticket):
                self._release_ticket(ticket)

            def lm_head(self, dtype=None):
                return torch.eye(self.vocab_size, self.hidden_size)

        return Engine()


def fake_engine_plugin():
    from kdcore.engines import EngineSpec

    class FakeSpec(EngineSpec):
        """A stand-in teacher engine for tests."""

        roles = ("teacher",)
        create_teacher = staticmethod(FakeTeacher.build)

        def check_recipe(self, section, prefix):
            return [f"{prefix}.path: the fake engine wants 'fake://' paths"] if not str(
                section.get("path", "")).startswith("fake://") else []

    def register_engines(register):
        register("fake", FakeSpec())

    return make_plugin(register_engines=register_engines)


def test_plugin_engine_is_chosen_by_the_recipe_and_built_by_the_registry():
    import torch

    from kdcore.recipe.loading import RolloutConfig, TeacherConfig, validate_raw
    from kdcore.engines import HiddenRequest, RolloutError, TeacherError, create_rollout_engine, create_teacher_engine

    kdcore.register_plugin(fake_engine_plugin(), "test-fake-engine")
    try:
        reg = kdcore.load_registry()
        assert "fake" in reg.names("engine") and reg.get("engine", "fake").summary == "A stand-in teacher engine for tests."
        raw = {"teacher": {"path": "fake://t", "engine": "fake"}, "data": {"train": "x.jsonl"}}
        assert validate_raw(raw, reg) == []
        # the engine's own section check runs, and only a teacher-capable engine may serve teacher.engine
        bad = validate_raw({**raw, "teacher": {"path": "t", "engine": "fake"}}, reg)
        assert bad == ["teacher.path: the fake engine wants 'fake://' paths"]
        assert validate_raw({**raw, "rollout": {"engine": "fake"}}, reg) == [
            "rollout.engine: engine 'fake' cannot serve as a rollout engine (it serves: teacher)"]
        cfg = TeacherConfig(path="fake://t", engine="fake")
        with create_teacher_engine(cfg, registry=reg, max_rows=8, threads=3, micro_batches_per_step=5) as eng:
            assert (eng.colocated, eng.n_slots, eng.threads, eng.path) == (True, 5, 3, "fake://t")
            ids = torch.tensor([[7, 8, 9]])
            with eng.hidden_states(HiddenRequest(ids, torch.ones_like(ids), [[2, 0]])) as h:
                assert h[:, :2].tolist() == [[9.0, 2.0], [7.0, 0.0]]
        with pytest.raises(RolloutError, match="rollout.engine: engine 'fake' cannot serve as a rollout engine"):
            create_rollout_engine("fake", registry=reg, config=None)
        with pytest.raises(TeacherError, match=r"^teacher.engine: unknown engine 'faek' \(did you mean 'fake'\?\); "
                                               r"installed: cache, fake, hf, inline, remote, sglang"):
            create_teacher_engine(TeacherConfig(path="x", engine="faek"), registry=reg, max_rows=8)
        assert RolloutConfig().engine == "hf"
    finally:
        kdcore.unregister_plugin("test-fake-engine")
    assert "fake" not in kdcore.load_registry().names("engine")


@dataclasses.dataclass
class EchoOptions:
    scale: float = 1.0  # multiplies every hidden row
    mode: str = dataclasses.field(default="ids", metadata={"choices": ("ids", "zeros")})

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def options_engine_plugin():
    """A third-party engine that takes options: its own dataclass, registered like a loss's."""
    from kdcore.engines import EngineSpec

    class EchoSpec(EngineSpec):
        """A teacher and rollout engine with options, for tests."""

        roles = ("teacher", "rollout")

        def create_teacher(self, teacher_cfg, *, max_rows, threads=None, micro_batches_per_step=1, options=None):
            engine = FakeTeacher.build(teacher_cfg, max_rows=max_rows, threads=threads,
                                       micro_batches_per_step=micro_batches_per_step)
            engine.options = options  # what the recipe's teacher.engine_options became
            return engine

        def create_rollout(self, *, config, device, dtype=None, threads=None, settings=None, options=None):
            return options  # stands in for an engine: the test only asks what reached the factory

    def register_engines(register):
        register("echo", EchoSpec(), options=EchoOptions)

    return make_plugin(register_engines=register_engines)


def test_plugin_engine_options_are_validated_like_loss_options_and_reach_the_factory():
    """A plugin engine is a peer of the built-ins: its settings go in <section>.engine_options,
    checked against the dataclass it registered (nearest key, types, choices, __post_init__)."""
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import TeacherConfig, validate_raw
    from kdcore.engines import TeacherError, create_rollout_engine, create_teacher_engine
    from kdcore.training.sampler import SamplingSettings

    kdcore.register_plugin(options_engine_plugin(), "test-options-engine")
    try:
        reg = kdcore.load_registry()
        assert reg.get("engine", "echo").option_fields() == {"scale": 1.0, "mode": "ids"}
        base = {"data": {"train": "x.jsonl"}}

        def teacher(**options):
            return {**base, "teacher": {"path": "fake://t", "engine": "echo", "engine_options": options}}

        assert validate_raw(teacher(scale=2.0, mode="zeros"), reg) == []
        assert validate_raw(teacher(scael=2.0), reg) == [
            "teacher.engine_options.scael: unknown key; did you mean 'teacher.engine_options.scale'? (valid: scale, mode)"]
        assert validate_raw(teacher(scale="big"), reg) == ["teacher.engine_options.scale: expected float, got str 'big'"]
        assert validate_raw(teacher(mode="zero"), reg) == [
            "teacher.engine_options.mode: 'zero' is not one of ids, zeros; did you mean 'zeros'?"]
        assert validate_raw(teacher(scale=-1.0), reg) == [
            "teacher.engine_options: engine 'echo' rejects {'scale': -1.0}: scale must be > 0, got -1.0"]
        # the same checks for each of several teachers and for the rollout section
        several = {**base, "teachers": [{"name": "a", "path": "fake://a", "engine": "echo",
                                         "engine_options": {"scael": 1.0}}]}
        assert validate_raw(several, reg) == [
            "teachers[0].engine_options.scael: unknown key; did you mean 'teachers[0].engine_options.scale'? "
            "(valid: scale, mode)"]
        assert validate_raw({**teacher(), "rollout": {"engine": "echo", "engine_options": {"mood": "ids"}}}, reg) == [
            "rollout.engine_options.mood: unknown key; did you mean 'rollout.engine_options.mode'? (valid: scale, mode)"]
        # a built-in without an options dataclass refuses engine_options, as a loss without options does
        assert validate_raw({**base, "teacher": {"path": "t", "engine": "hf", "engine_options": {"scale": 2}}}, reg) == [
            "teacher.engine_options: engine 'hf' takes no options, got scale"]
        # the loaded section (an OmegaConf node, as the trainer has it) reaches the factory as the dataclass
        section = OmegaConf.merge(OmegaConf.structured(TeacherConfig),
                                  {"path": "fake://t", "engine": "echo", "engine_options": {"scale": 3}})
        with create_teacher_engine(section, registry=reg, max_rows=8) as eng:
            assert eng.options == EchoOptions(scale=3.0)
        with create_teacher_engine(TeacherConfig(path="fake://t", engine="echo"), registry=reg, max_rows=8) as eng:
            assert eng.options == EchoOptions()  # no engine_options: the dataclass defaults
        settings = SamplingSettings.from_config(OmegaConf.create({"engine": "echo", "engine_options": {"mode": "zeros"}}))
        assert create_rollout_engine("echo", registry=reg, config=None, settings=settings) == EchoOptions(mode="zeros")
        with pytest.raises(TeacherError, match=r"^teacher.engine_options: engine 'hf' takes no options, got scale$"):
            create_teacher_engine(TeacherConfig(path="t", engine="hf", engine_options={"scale": 2}), registry=reg,
                                  max_rows=8)
    finally:
        kdcore.unregister_plugin("test-options-engine")


def test_misspelled_engine_in_a_recipe_gets_did_you_mean():
    from kdcore.recipe.loading import validate_raw

    errors = validate_raw({"teacher": {"path": "t", "engine": "sglnag"}, "rollout": {"engine": "hf_"},
                           "data": {"train": "x.jsonl"}})
    assert errors == ["teacher.engine: unknown engine 'sglnag' (did you mean 'sglang'?); installed: cache, hf, inline, remote, sglang",
                      "rollout.engine: unknown engine 'hf_' (did you mean 'hf'?); installed: cache, hf, inline, remote, sglang"]


@pytest.mark.parametrize("spec, message", [
    (object(), "engine 'broken' needs `roles`"),
    (types.SimpleNamespace(roles=("teacher",)), "serves 'teacher' but has no create_teacher() method"),
    (types.SimpleNamespace(roles=("student",), create_student=lambda: None), "needs `roles`"),
])
def test_a_malformed_engine_spec_is_refused_at_registration(spec, message):
    def register_engines(register):
        register("broken", spec)

    kdcore.register_plugin(make_plugin(register_engines=register_engines), "test-broken-engine")
    try:
        with pytest.raises(PluginError, match=f"plugin 'test-broken-engine' .*{message}".replace("(", r"\(").replace(")", r"\)")):
            kdcore.load_registry()
    finally:
        kdcore.unregister_plugin("test-broken-engine")


def test_unknown_hook_error_lists_every_hook():
    def register_engine(register):  # typo: the hook is register_engines
        pass

    kdcore.register_plugin(make_plugin(register_engine=register_engine), "test-typo-engine")
    try:
        with pytest.raises(PluginError, match="hooks are register_losses, register_aligners, register_rollouts, "
                                              "register_engines"):
            kdcore.load_registry()
    finally:
        kdcore.unregister_plugin("test-typo-engine")


def test_list_algorithms_lists_the_engines():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdcore", "list-algorithms", "--kind", "engine", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert {(e["name"], e["kind"], e["plugin"]) for e in json.loads(out)} == {("hf", "engine", "kdflow"), ("inline", "engine", "kdflow"),
                                                                               ("remote", "engine", "kdflow"),
                                                                               ("sglang", "engine", "kdflow"),
                                                                               ("cache", "engine", "kdflow")}
