"""Validation of zg.Config, zg.EngineConfig and the hypergradient method objects.

Every wrong value raises ``zg.ConfigError`` (a ``ValueError``) whose ``field`` and message
name the field and the value; never a TypeError, AssertionError or anything else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ziggurat as zg
from ziggurat.registry import REGISTRY

# every registered method name, as error messages list them
KNOWN_TYPES = f"one of {sorted(REGISTRY)}"


def expect_config_error(
    fn: Any, owner: str, field: str, value: object, *fragments: str
) -> zg.ConfigError:
    with pytest.raises(zg.ConfigError) as info:
        fn()
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.owner, err.field) == (owner, field)
    msg = str(err)
    assert msg.startswith(f"{owner}.{field}={value!r} is not allowed: "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return err


def test_config_error_is_a_value_error_and_a_ziggurat_error() -> None:
    assert issubclass(zg.ConfigError, ValueError)
    assert issubclass(zg.ConfigError, zg.ZigguratError)
    err = zg.ConfigError("Config", "unroll_steps", 0, "an integer >= 1")
    assert (err.owner, err.field, err.value, err.allowed) == (
        "Config",
        "unroll_steps",
        0,
        "an integer >= 1",
    )
    assert str(err) == "Config.unroll_steps=0 is not allowed: an integer >= 1"


# --------------------------------------------------------------------------- Config
@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("unroll_steps", 0, "an integer >= 1"),
        ("unroll_steps", -3, "an integer >= 1"),
        ("unroll_steps", 2.0, "an integer >= 1"),
        ("unroll_steps", True, "an integer >= 1"),
        ("unroll_steps", "3", "an integer >= 1"),
        ("unroll_steps", None, "an integer >= 1"),
        ("warmup_steps", -1, "an integer >= 0"),
        ("warmup_steps", 1.5, "an integer >= 0"),
        ("warmup_steps", False, "an integer >= 0"),
        ("roll_back", 1, "True or False"),
        ("roll_back", "yes", "True or False"),
        ("roll_back", None, "True or False"),
        ("check_finite", 0, "True or False"),
        ("check_finite", "False", "True or False"),
    ],
)
def test_config_scalar_fields(field: str, value: object, allowed: str) -> None:
    expect_config_error(lambda: zg.Config(**{field: value}), "Config", field, value, allowed)


def test_config_type_none_means_the_problem_default() -> None:
    assert zg.Config().method is None
    m = torch.nn.Linear(1, 1)
    problem = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert problem.method == zg.Darts()


@pytest.mark.parametrize("value", ["bogus", "CG", "", 3, zg.CG])
def test_config_unknown_type(value: object) -> None:
    expect_config_error(
        lambda: zg.Config(type=value),
        "Config",
        "type",
        value,
        KNOWN_TYPES,
        "zg.CG(iterations=20)",
    )


def test_method_object_plus_shorthand_field() -> None:
    method = zg.CG(iterations=5)
    expect_config_error(
        lambda: zg.Config(type=method, cg_iterations=3),
        "Config",
        "cg_iterations",
        3,
        "only with type in ['cg'] given by name",
        "put the setting on the method object instead, e.g. zg.CG(iterations=3)",
    )


@pytest.mark.parametrize(
    ("type_", "field", "value", "methods", "example"),
    [
        ("neumann", "cg_iterations", 3, "['cg']", "zg.CG(iterations=3)"),
        ("darts", "cg_damping", 0.1, "['cg']", "zg.CG(damping=0.1)"),
        ("cg", "neumann_iterations", 4, "['neumann']", "zg.Neumann(iterations=4)"),
        ("sama", "neumann_alpha", 0.5, "['neumann']", "zg.Neumann(alpha=0.5)"),
        ("neumann", "fixed_point_iterations", 2, "['fixed_point']", "zg.FixedPoint(iterations=2)"),
        ("cg", "fixed_point_alpha", 0.2, "['fixed_point']", "zg.FixedPoint(alpha=0.2)"),
        ("cg", "darts_alpha", 0.01, "['darts', 'sama']", "zg.Darts(fd_eps=0.01)"),
    ],
)
def test_shorthand_of_another_method(
    type_: str, field: str, value: object, methods: str, example: str
) -> None:
    expect_config_error(
        lambda: zg.Config(type=type_, **{field: value}),
        "Config",
        field,
        value,
        f"only with type in {methods} given by name (type is {type_!r})",
        example,
    )


@pytest.mark.parametrize(
    ("type_", "field", "value", "allowed"),
    [
        ("cg", "cg_iterations", -1, "an integer >= 1"),
        ("cg", "cg_iterations", 0, "an integer >= 1"),
        ("cg", "cg_iterations", 2.5, "an integer >= 1"),
        ("cg", "cg_damping", -1.0, "a finite number >= 0"),
        ("cg", "cg_damping", float("inf"), "a finite number >= 0"),
        ("neumann", "neumann_iterations", -1, "an integer >= 0"),
        ("neumann", "neumann_alpha", 0.0, "a finite number > 0 or None"),
        ("neumann", "neumann_alpha", float("nan"), "a finite number > 0 or None"),
        ("fixed_point", "fixed_point_iterations", 0, "an integer >= 1"),
        ("fixed_point", "fixed_point_alpha", -0.5, "a finite number > 0 or None"),
        ("darts", "darts_alpha", 0, "a finite number > 0"),
        ("sama", "darts_alpha", True, "a finite number > 0"),
    ],
)
def test_bad_shorthand_value_names_the_shorthand(
    type_: str, field: str, value: object, allowed: str
) -> None:
    err = expect_config_error(
        lambda: zg.Config(type=type_, **{field: value}), "Config", field, value, allowed
    )
    assert err.allowed == allowed


@pytest.mark.parametrize(
    ("config", "method"),
    [
        (zg.Config(type="darts"), zg.Darts()),
        (zg.Config(type="cg", cg_iterations=20), zg.CG(iterations=20)),
        (zg.Config(type="cg", cg_iterations=7, cg_damping=1e-3), zg.CG(iterations=7, damping=1e-3)),
        (
            zg.Config(type="neumann", neumann_iterations=0, neumann_alpha=0.5),
            zg.Neumann(iterations=0, alpha=0.5),
        ),
        (
            zg.Config(type="fixed_point", fixed_point_iterations=4, fixed_point_alpha=0.3),
            zg.FixedPoint(iterations=4, alpha=0.3),
        ),
        (zg.Config(type="darts", darts_alpha=0.5), zg.Darts(fd_eps=0.5)),
        (zg.Config(type="sama", darts_alpha=0.02), zg.SAMA(fd_eps=0.02)),
        (zg.Config(type="sama"), zg.SAMA()),
    ],
)
def test_valid_config_builds_the_method(config: zg.Config, method: zg.HypergradMethod) -> None:
    assert config.method == method
    assert type(config.method) is type(method)


def test_method_object_is_used_as_is() -> None:
    method = zg.Neumann(iterations=3, alpha=0.1)
    config = zg.Config(
        type=method, unroll_steps=4, roll_back=True, warmup_steps=2, check_finite=False
    )
    assert config.method is method
    assert (config.unroll_steps, config.roll_back, config.warmup_steps, config.check_finite) == (
        4,
        True,
        2,
        False,
    )


def test_config_is_frozen() -> None:
    config = zg.Config()
    with pytest.raises(AttributeError):
        config.unroll_steps = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- method objects
@pytest.mark.parametrize(
    ("build", "owner", "field", "value", "allowed"),
    [
        (lambda: zg.CG(iterations=0), "CG", "iterations", 0, "an integer >= 1"),
        (lambda: zg.CG(iterations=True), "CG", "iterations", True, "an integer >= 1"),
        (lambda: zg.CG(damping=-1), "CG", "damping", -1, "a finite number >= 0"),
        (lambda: zg.CG(tol=0.0), "CG", "tol", 0.0, "a finite number > 0 or None"),
        (lambda: zg.CG(fd_eps=0), "CG", "fd_eps", 0, "a finite number > 0"),
        (lambda: zg.CG(mixed="bogus"), "CG", "mixed", "bogus",
         "one of ('auto', 'exact', 'forward', 'fd')"),
        (lambda: zg.Neumann(alpha=0), "Neumann", "alpha", 0, "a finite number > 0 or None"),
        (
            lambda: zg.Neumann(alpha=float("nan")),
            "Neumann",
            "alpha",
            float("nan"),
            "a finite number > 0 or None",
        ),
        (lambda: zg.Neumann(iterations=-1), "Neumann", "iterations", -1, "an integer >= 0"),
        (
            lambda: zg.Neumann(power_iterations=0),
            "Neumann",
            "power_iterations",
            0,
            "an integer >= 1",
        ),
        (lambda: zg.Neumann(alpha_refresh=0), "Neumann", "alpha_refresh", 0, "an integer >= 1"),
        (lambda: zg.FixedPoint(iterations=0), "FixedPoint", "iterations", 0, "an integer >= 1"),
        (
            lambda: zg.FixedPoint(alpha=float("inf")),
            "FixedPoint",
            "alpha",
            float("inf"),
            "a finite number > 0 or None",
        ),
        (
            lambda: zg.FixedPoint(mixed="exactly"),
            "FixedPoint",
            "mixed",
            "exactly",
            "one of ('auto', 'exact', 'forward', 'fd')",
        ),
        (lambda: zg.Darts(scale=-1), "Darts", "scale", -1, "a finite number > 0"),
        (lambda: zg.Darts(scale=0.0), "Darts", "scale", 0.0, "a finite number > 0"),
        (lambda: zg.Darts(fd_eps=0), "Darts", "fd_eps", 0, "a finite number > 0"),
        (
            lambda: zg.Darts(mixed="bogus"),
            "Darts",
            "mixed",
            "bogus",
            "one of ('auto', 'exact', 'forward', 'fd')",
        ),
        (lambda: zg.SAMA(mixed=None), "SAMA", "mixed", None,
         "one of ('auto', 'exact', 'forward', 'fd')"),
        (lambda: zg.SAMA(fd_eps=-0.01), "SAMA", "fd_eps", -0.01, "a finite number > 0"),
    ],
)
def test_method_object_validation(
    build: Any, owner: str, field: str, value: object, allowed: str
) -> None:
    err = expect_config_error(build, owner, field, value, allowed)
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(err.value)  # type: ignore[arg-type]
    else:
        assert err.value == value


def test_fixed_point_warm_start_must_be_bool() -> None:
    expect_config_error(
        lambda: zg.FixedPoint(warm_start="yes"), "FixedPoint", "warm_start", "yes", "True or False"
    )


@pytest.mark.parametrize(
    ("build", "owner", "field"),
    [
        (
            lambda v: zg.EngineConfig(early_stopping_min_delta=v),
            "EngineConfig",
            "early_stopping_min_delta",
        ),
        (lambda v: zg.Config(type="cg", cg_damping=v), "Config", "cg_damping"),
        (lambda v: zg.CG(damping=v), "CG", "damping"),
        (lambda v: zg.Neumann(alpha=v), "Neumann", "alpha"),
        (lambda v: zg.Darts(scale=v), "Darts", "scale"),
    ],
)
def test_huge_int_in_float_field_is_a_config_error(build: Any, owner: str, field: str) -> None:
    huge = 10**400
    with pytest.raises(zg.ConfigError) as info:
        build(huge)
    assert (info.value.owner, info.value.field) == (owner, field)


def test_register_needs_a_name() -> None:
    class Nameless(zg.Darts):
        name = ""

    expect_config_error(
        lambda: zg.register(Nameless), "Nameless", "name", "", "a non-empty registry name"
    )


def test_registered_method_is_usable_by_name() -> None:
    from ziggurat.hypergrad import REGISTRY

    class Scaled(zg.Darts):
        name = "scaled_identity"

    try:
        assert zg.register(Scaled) is Scaled
        config = zg.Config(type="scaled_identity")
        assert type(config.method) is Scaled
        # shorthand fields stay tied to their own methods
        expect_config_error(
            lambda: zg.Config(type="scaled_identity", cg_iterations=2),
            "Config",
            "cg_iterations",
            2,
            "only with type in ['cg']",
        )
    finally:
        REGISTRY.pop("scaled_identity", None)
    expect_config_error(
        lambda: zg.Config(type="scaled_identity"),
        "Config",
        "type",
        "scaled_identity",
        KNOWN_TYPES,
    )


# --------------------------------------------------------------------------- EngineConfig
@pytest.mark.parametrize(
    ("kwargs", "field", "value", "allowed"),
    [
        ({"train_iters": 0}, "train_iters", 0, "an integer >= 1"),
        ({"train_iters": -5}, "train_iters", -5, "an integer >= 1"),
        ({"train_iters": 10.0}, "train_iters", 10.0, "an integer >= 1"),
        ({"train_iters": True}, "train_iters", True, "an integer >= 1"),
        ({"valid_step": 0}, "valid_step", 0, "an integer >= 1"),
        ({"valid_step": 2.5}, "valid_step", 2.5, "an integer >= 1"),
        ({"log_step": 0}, "log_step", 0, "an integer >= 1"),
        (
            {"early_stopping_metric": ""},
            "early_stopping_metric",
            "",
            "None or the name of a metric returned by Engine.validation()",
        ),
        (
            {"early_stopping_metric": 3, "valid_step": 1},
            "early_stopping_metric",
            3,
            "None or the name of a metric",
        ),
        (
            {"early_stopping_metric": "loss"},
            "valid_step",
            None,
            "an integer >= 1 when early_stopping_metric is set",
        ),
        ({"early_stopping_mode": "mean"}, "early_stopping_mode", "mean", "'min' or 'max'"),
        ({"early_stopping_mode": None}, "early_stopping_mode", None, "'min' or 'max'"),
        ({"early_stopping_patience": 0}, "early_stopping_patience", 0, "an integer >= 1"),
        ({"early_stopping_patience": 1.0}, "early_stopping_patience", 1.0, "an integer >= 1"),
        (
            {"early_stopping_min_delta": -0.1},
            "early_stopping_min_delta",
            -0.1,
            "a finite number >= 0",
        ),
        (
            {"early_stopping_min_delta": float("inf")},
            "early_stopping_min_delta",
            float("inf"),
            "a finite number >= 0",
        ),
        (
            {"early_stopping_min_delta": False},
            "early_stopping_min_delta",
            False,
            "a finite number >= 0",
        ),
    ],
)
def test_engine_config_fields(
    kwargs: dict[str, Any], field: str, value: object, allowed: str
) -> None:
    expect_config_error(lambda: zg.EngineConfig(**kwargs), "EngineConfig", field, value, allowed)


def test_valid_engine_config() -> None:
    cfg = zg.EngineConfig(
        train_iters=7,
        valid_step=2,
        early_stopping_metric="acc",
        early_stopping_mode="max",
        early_stopping_patience=3,
        early_stopping_min_delta=0,
        log_step=5,
    )
    assert (
        cfg.train_iters,
        cfg.valid_step,
        cfg.early_stopping_metric,
        cfg.early_stopping_mode,
        cfg.early_stopping_patience,
        cfg.early_stopping_min_delta,
        cfg.log_step,
    ) == (7, 2, "acc", "max", 3, 0, 5)
    default = zg.EngineConfig()
    assert (default.train_iters, default.valid_step, default.early_stopping_metric) == (
        1000,
        None,
        None,
    )


# --------------------------------------------------------------------------- Engine / Problem args
def _problem(name: str = "p") -> zg.Problem:
    module = torch.nn.Linear(2, 1).double()
    return zg.Problem(name, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1))


def test_engine_rejects_a_problem_config_as_engine_config() -> None:
    expect_config_error(
        lambda: zg.Engine([_problem()], config=zg.Config()),  # type: ignore
        "Engine",
        "config",
        "Config",
        "a zg.EngineConfig",
    )


def test_engine_rejects_a_single_problem_instead_of_a_list() -> None:
    p = _problem()
    with pytest.raises(zg.ConfigError) as info:
        zg.Engine(p)  # type: ignore[arg-type]
    assert (info.value.owner, info.value.field) == ("Engine", "problems")
    assert "a list of zg.Problem objects" in str(info.value)


@pytest.mark.parametrize("name", ["", None, 5])
def test_problem_name_must_be_a_nonempty_string(name: object) -> None:
    expect_config_error(
        lambda: zg.Problem(name),
        "Problem",
        "name",
        name,  # type: ignore
        "a non-empty string",
    )


def test_problem_config_must_be_a_config() -> None:
    expect_config_error(
        lambda: zg.Problem("p", config=zg.EngineConfig()),  # type: ignore[arg-type]
        "p",
        "config",
        "EngineConfig",
        "a zg.Config",
    )


# --------------------------------------------------------------------------- fuzzing
# Arbitrary values, including ints far beyond the float range.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**1100), max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["darts", "sama", "cg", "neumann", "fixed_point", "min", "max", "loss"]),
)

CONFIG_FIELDS: dict[str, str] = {
    # field -> the ``type`` under which a shorthand is allowed (plain fields: default type)
    "type": "darts",
    "unroll_steps": "darts",
    "roll_back": "darts",
    "warmup_steps": "darts",
    "check_finite": "darts",
    "cg_iterations": "cg",
    "cg_damping": "cg",
    "neumann_iterations": "neumann",
    "neumann_alpha": "neumann",
    "fixed_point_iterations": "fixed_point",
    "fixed_point_alpha": "fixed_point",
    "darts_alpha": "darts",
}
# every other field of Config is a plain field, fuzzed under the default type
CONFIG_FIELDS.update({f.name: "darts" for f in dataclasses.fields(zg.Config)
                      if f.init and f.name not in CONFIG_FIELDS})


def _check_error_names(err: zg.ConfigError, owner: str, field: str) -> None:
    assert (err.owner, err.field) == (owner, field)
    assert str(err).startswith(f"{owner}.{field}=")


def _build_config(field: str, value: object, type_: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    if field != "type":
        kwargs["type"] = type_
    try:
        config = zg.Config(**kwargs)
    except zg.ConfigError as err:
        _check_error_names(err, "Config", field)
    else:
        assert getattr(config, field) is value
        # type=None defers to the problem class's default method
        assert config.method is None if config.type is None else isinstance(
            config.method, zg.registry.Method
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(CONFIG_FIELDS)), value=ANY_VALUE)
def test_fuzz_config_field(field: str, value: object) -> None:
    _build_config(field, value, CONFIG_FIELDS[field])


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(sorted(CONFIG_FIELDS)),
    value=ANY_VALUE,
    type_=st.sampled_from(["darts", "sama", "cg", "neumann", "fixed_point"]),
)
def test_fuzz_config_field_under_any_type(field: str, value: object, type_: str) -> None:
    _build_config(field, value, type_)


# every field of EngineConfig (new fields are fuzzed as soon as they exist)
ENGINE_FIELDS = [f.name for f in dataclasses.fields(zg.EngineConfig) if f.init]


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(ENGINE_FIELDS), value=ANY_VALUE)
def test_fuzz_engine_config_field(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    if field == "early_stopping_metric":
        kwargs["valid_step"] = 1  # so that only the metric itself is judged
    if field in ("checkpoint_step", "resume", "keep_last"):
        kwargs["checkpoint_dir"] = "ckpt"  # likewise: the setting they need is present
    try:
        cfg = zg.EngineConfig(**kwargs)
    except zg.ConfigError as err:
        _check_error_names(err, "EngineConfig", field)
    else:
        assert getattr(cfg, field) is value


METHOD_FIELDS: dict[type, list[str]] = {
    zg.CG: ["iterations", "damping", "tol", "mixed", "fd_eps"],
    zg.Neumann: ["iterations", "alpha", "power_iterations", "alpha_refresh", "mixed", "fd_eps"],
    zg.FixedPoint: ["iterations", "alpha", "power_iterations", "alpha_refresh", "mixed", "fd_eps"],
    zg.Darts: ["scale", "mixed", "fd_eps"],
    zg.SAMA: ["mixed", "fd_eps"],
}
METHOD_FIELD_PAIRS = [(cls, f) for cls, fs in METHOD_FIELDS.items() for f in fs]


@settings(max_examples=200, deadline=None)
@given(pair=st.sampled_from(METHOD_FIELD_PAIRS), value=ANY_VALUE)
def test_fuzz_method_field(pair: tuple[type, str], value: object) -> None:
    cls, field = pair
    try:
        method = cls(**{field: value})
    except zg.ConfigError as err:
        _check_error_names(err, cls.__name__, field)
    else:
        assert getattr(method, field) is value


def test_fuzz_examples_that_must_fail_name_their_field() -> None:
    # the fuzz tests accept success; these values must fail, with the field named
    for field, value, pattern in [
        ("unroll_steps", float("nan"), r"^Config\.unroll_steps=nan "),
        ("warmup_steps", "0", r"^Config\.warmup_steps='0' "),
        ("check_finite", None, r"^Config\.check_finite=None "),
    ]:
        with pytest.raises(zg.ConfigError, match=pattern):
            zg.Config(**{field: value})
    with pytest.raises(zg.ConfigError, match=re.escape("Config.cg_damping=nan")):
        zg.Config(type="cg", cg_damping=float("nan"))
    with pytest.raises(zg.ConfigError, match=re.escape("Config.neumann_iterations=-1 ")):
        zg.Config(type="neumann", neumann_iterations=-1)


def test_method_objects_compare_by_settings() -> None:
    assert zg.CG(iterations=20) == zg.CG(iterations=20)
    assert zg.CG(iterations=20) != zg.CG(iterations=21)
    assert zg.Config(type="cg", cg_iterations=20).method != zg.CG()
