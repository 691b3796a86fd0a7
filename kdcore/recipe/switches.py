"""Options of a switched-off feature: valid, but they do nothing, which a user who set them did
not mean (issue 28: ``student.lora.r=8`` without ``student.lora.enabled=true`` trained the full
student without a word). One warning line per option, naming the switch that turns it on.

"Set" means "differs from the schema's default", so the check gives the same answer on a raw
recipe and on one resolved with every default (``kdcore train`` warns on the resolved one).
"""

from __future__ import annotations

from typing import Any, Callable

from kdcore.recipe.schema import get_dotted

# (section of the options, the switch, is the feature on?, the options it governs (None: every
# key of the section but the switch), how to turn it on)
_SWITCHED: list[tuple[str, str, Callable[[Any], bool], tuple[str, ...] | None, str]] = [
    ("student.lora", "student.lora.enabled", bool, None, "student.lora.enabled=true"),
    ("teacher", "teacher.ema", bool, ("ema_every",), "teacher.ema=<decay in (0, 1)>, e.g. 0.99"),
    ("student", "student.init", lambda v: v == "truncate", ("num_layers",), "student.init=truncate"),
    ("student", "student.init", lambda v: v == "config", ("config_overrides",), "student.init=config"),
]


def _defaults(section: str) -> dict:
    """The schema's default of every key of a dotted section (``student.lora``)."""
    import dataclasses
    import typing

    from kdcore.recipe.schema import Recipe

    tp: Any = Recipe
    for part in section.split("."):
        tp = typing.get_type_hints(tp)[part]
    out = {}
    for f in dataclasses.fields(tp):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def switched_off_warnings(raw: dict) -> list[str]:
    """One line per option that is set while the feature it belongs to is off."""
    out = []
    for section, switch, is_on, keys, how in _SWITCHED:
        values = get_dotted(raw, section)
        if not isinstance(values, dict):
            continue
        switch_value = get_dotted(raw, switch)
        if switch_value is None:
            switch_value = _defaults(switch.rsplit(".", 1)[0]).get(switch.rsplit(".", 1)[1])
        if is_on(switch_value):
            continue
        defaults = _defaults(section)
        leaf = switch.rsplit(".", 1)[1]
        for key in keys or [k for k in values if k != leaf]:
            if key in values and key in defaults and values[key] != defaults[key] and values[key] is not None:
                shown = str(switch_value).lower() if isinstance(switch_value, bool) else repr(switch_value)
                out.append(f"{section}.{key}={values[key]!r} is ignored: {switch} is {shown} "
                           f"(set {how} to use it)")
    data = raw.get("data")
    if isinstance(data, dict) and data.get("eval") is not None and "eval_size" in data \
            and data["eval_size"] != _defaults("data")["eval_size"]:
        out.append(f"data.eval_size={data['eval_size']!r} is ignored: data.eval names the held-out set "
                   f"(remove data.eval to split eval_size rows off data.train)")
    return out
