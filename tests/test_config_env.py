"""EngineConfig's knobs that were environment variables: each is a field, validated; its default reads the old
variable (config.ENV_ALIASES, the one place that reads them), and an argument passed explicitly wins."""
import os

import pytest

from yaie_jax.config import ENV_ALIASES, EngineConfig, env_default

OLD_NAMES = {"tp_head_layout": "YAIE_TP_HEAD", "compiled_program_store": "YAIE_AOT_CACHE",
             "log_compiles": "YAIE_LOG_COMPILE_CACHE", "hub_timeout_s": "YAIE_HUB_TIMEOUT_S",
             "compile_cache_dir": "YAIE_COMPILE_CACHE_DIR"}


@pytest.fixture(autouse=True)
def _no_aliases(monkeypatch):
    for var in OLD_NAMES.values():
        monkeypatch.delenv(var, raising=False)


def test_every_alias_is_listed():
    assert {field: var for field, (var, _, _) in ENV_ALIASES.items()} == OLD_NAMES


def test_built_in_defaults():
    c = EngineConfig()
    assert (c.tp_head_layout, c.compiled_program_store, c.log_compiles, c.hub_timeout_s) == ("replicated", None, 0,
                                                                                              10.0)
    assert c.compile_cache_dir == os.path.join(os.path.expanduser("~"), ".cache", "yaie_jax", "xla")


@pytest.mark.parametrize("field,text,value", [
    ("tp_head_layout", "vocab", "vocab"), ("tp_head_layout", "", "replicated"),
    ("compiled_program_store", "1", True), ("compiled_program_store", "off", False),
    ("compiled_program_store", "No", False), ("compiled_program_store", "", None),
    ("log_compiles", "1", 1), ("log_compiles", "2", 2), ("log_compiles", "yes", 1), ("log_compiles", "0", 0),
    ("log_compiles", "", 0), ("hub_timeout_s", "2.5", 2.5), ("compile_cache_dir", "", ""),
    ("compile_cache_dir", "/tmp/x", "/tmp/x"),
])
def test_old_variables_set_the_defaults(monkeypatch, field, text, value):
    monkeypatch.setenv(OLD_NAMES[field], text)
    assert getattr(EngineConfig(), field) == value
    assert env_default(field, {OLD_NAMES[field]: text}) == value
    explicit = {"tp_head_layout": "replicated", "compiled_program_store": True, "log_compiles": 0,
                "hub_timeout_s": 7.0, "compile_cache_dir": None}[field]
    assert getattr(EngineConfig(**{field: explicit}), field) == explicit        # an argument wins


@pytest.mark.parametrize("var,text", [("YAIE_TP_HEAD", "rows"), ("YAIE_HUB_TIMEOUT_S", "soon")])
def test_bad_variables_are_named(monkeypatch, var, text):
    monkeypatch.setenv(var, text)
    with pytest.raises(ValueError, match=f"invalid environment variable {var}="):
        EngineConfig()


@pytest.mark.parametrize("field,value", [
    ("tp_head_layout", "rows"), ("compiled_program_store", "yes"), ("compiled_program_store", 1),
    ("log_compiles", 3), ("log_compiles", True), ("log_compiles", "1"), ("hub_timeout_s", 0),
    ("hub_timeout_s", -1.0), ("hub_timeout_s", "10"),
])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"invalid engine argument {field}="):
        EngineConfig(**{field: value})
