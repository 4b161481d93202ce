"""Server settings and layered configuration: defaults < YAML file < environment < CLI flags.

`load_settings(argv, environ)` returns a `Settings` holding a validated `EngineConfig` (engine semantics are
unchanged: this module only decides *which values* it gets), a validated `ServerSettings`, and where every
non-default value came from (`sources`), which `serve` prints at start-up.

Layers (a later layer replaces a value set by an earlier one; lists such as api keys are replaced, not merged):

1. defaults       the dataclass defaults of `EngineConfig` and `ServerSettings`
2. YAML file      `--config PATH` (or `YAIE_CONFIG`). The seed's schema::

                      model:     {name, dtype, quantization, tensor_parallel_size, tokenizer, max_model_len,
                                  served_model_name}
                      scheduler: {max_batch_size, max_prefill_batch_size, max_decode_batch_size,
                                  max_num_batched_tokens, policy, ...}
                      memory:    {gpu_blocks, cpu_blocks, block_size, gpu_memory_utilization, enable_radix_cache}
                      server:    {<any ServerSettings field>}
                      engine:    {<any EngineConfig field>}

                  Top-level keys that are EngineConfig/ServerSettings field names are accepted too, and
                  `model: NAME` may be a plain string. Unknown keys are an error (a typo must not be silently
                  ignored).
3. environment    `YAIE_<FIELD>` for every EngineConfig and ServerSettings field (e.g. `YAIE_MAX_NUM_SEQS`,
                  `YAIE_PORT`), `YAIE_API_KEY` (one key, or several separated by commas), the seed's names
                  `MODEL_NAME`, `MAX_BATCH_SIZE`, `GPU_MEMORY_UTIL`, `ENABLE_RADIX_CACHE`, and the names of knobs
                  that were environment variables before they were fields (`yaie_jax.config.ENV_ALIASES`:
                  `YAIE_TP_HEAD` -> tp_head_layout, `YAIE_AOT_CACHE` -> compiled_program_store,
                  `YAIE_LOG_COMPILE_CACHE` -> log_compiles, read with their old spellings). A `YAIE_<FIELD>`
                  name wins over a seed name or an alias for the same field. This layer is the one place the
                  server reads these variables: `environ` is all it reads, never os.environ behind it.
4. CLI flags      `--<field-name>` for every field (booleans also as `--no-<field-name>`), `--api-key` (repeatable),
                  the seed aliases `--max-batch-size`, `--gpu-blocks`, `--cpu-blocks`, `--enable-radix-cache`,
                  `--gpu-memory-util`, and an optional positional MODEL.

Mapping of the seed's names onto EngineConfig (vLLM's names):

    model.name                      -> model
    scheduler.max_batch_size        -> max_num_seqs            (MAX_BATCH_SIZE, --max-batch-size)
    scheduler.max_decode_batch_size -> max_num_seqs            (every running sequence decodes each step, so the
                                                                decode batch is the running set; with both set in
                                                                one layer the smaller wins)
    scheduler.max_prefill_batch_size   (no equivalent: prefill per step is bounded by max_num_batched_tokens;
                                        accepted with a warning in `Settings.warnings`)
    scheduler.policy                -> scheduling_policy
    memory.gpu_blocks               -> num_gpu_blocks          (--gpu-blocks)
    memory.cpu_blocks               -> num_cpu_blocks          (--cpu-blocks)
    memory.gpu_memory_util(ization) -> gpu_memory_utilization  (GPU_MEMORY_UTIL, --gpu-memory-util)
    memory.enable_radix_cache       -> enable_prefix_caching   (ENABLE_RADIX_CACHE, --enable-radix-cache)

Every bad value raises `ConfigError` (a `ValueError`) naming the key, variable or flag it came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import ENV_ALIASES, EngineConfig, builtin_default, env_default, parse_switch
from .http_settings import ConfigError, ServerSettings, Settings


# ---------------------------------------------------------------------------------------------------- schema
ENGINE_FIELDS = EngineConfig.field_names()
SERVER_FIELDS = ServerSettings.field_names()

# seed YAML sections: key -> EngineConfig field (None: accepted, no equivalent)
_SECTION_KEYS: Dict[str, Dict[str, Optional[str]]] = {
    "model": {"name": "model", "model": "model", "dtype": "dtype", "tensor_parallel_size": "tensor_parallel_size",
              "tokenizer": "tokenizer", "max_model_len": "max_model_len",
              "served_model_name": "served_model_name", "attention_backend": "attention_backend",
              "cascade_attention": "cascade_attention", "quantization": "quantization",
              "quantization_group_size": "quantization_group_size"},
    "scheduler": {"max_batch_size": "max_num_seqs", "max_decode_batch_size": "max_num_seqs",
                  "max_prefill_batch_size": None, "max_num_seqs": "max_num_seqs",
                  "max_num_batched_tokens": "max_num_batched_tokens", "policy": "scheduling_policy",
                  "scheduling_policy": "scheduling_policy", "enable_chunked_prefill": "enable_chunked_prefill",
                  "preemption_mode": "preemption_mode", "target_itl_ms": "target_itl_ms",
                  "num_decode_steps": "num_decode_steps", "async_scheduling": "async_scheduling"},
    "memory": {"gpu_blocks": "num_gpu_blocks", "num_gpu_blocks": "num_gpu_blocks", "cpu_blocks": "num_cpu_blocks",
               "num_cpu_blocks": "num_cpu_blocks", "block_size": "block_size",
               "gpu_memory_utilization": "gpu_memory_utilization", "gpu_memory_util": "gpu_memory_utilization",
               "enable_radix_cache": "enable_prefix_caching", "enable_prefix_caching": "enable_prefix_caching"},
}
_MIN_COMBINED = {("scheduler", "max_batch_size"), ("scheduler", "max_decode_batch_size"),
                 ("scheduler", "max_num_seqs")}

_SEED_ENV = {"MODEL_NAME": "model", "MAX_BATCH_SIZE": "max_num_seqs", "GPU_MEMORY_UTIL": "gpu_memory_utilization",
             "ENABLE_RADIX_CACHE": "enable_prefix_caching"}

# ServerSettings fields whose YAIE_<FIELD> variable keeps the lenient spelling it had before it was a field
# (empty and "0"/false/no/off: off; anything else: on)
_LENIENT_SERVER_SWITCHES = {"startup_profile"}

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE = {"none", "null", ""}


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


_ENGINE_TYPES = _hints(EngineConfig)
_SERVER_TYPES = _hints(ServerSettings)


def _split_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/env/CLI value to the annotated type `tp`; `ConfigError` mentioning `where` if impossible."""
    base, optional = _split_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and base is not str):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int,)) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off)")
        if base is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected an integer")
                return int(value)
            return int(str(value).strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError("expected a number, got a boolean")
            v = float(str(value).strip()) if isinstance(value, str) else float(value)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError("expected a finite number")
            return v
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
        if typing.get_origin(base) in (list, List):
            if isinstance(value, str):
                return [p.strip() for p in value.split(",") if p.strip()]
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise ValueError("expected a list")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot use {value!r}: {e}") from None
    return value


# ---------------------------------------------------------------------------------------------------- layers
class _Layer:
    """Values of one layer: engine and server dicts, plus where each came from."""

    def __init__(self, name: str):
        self.name = name
        self.engine: Dict[str, Any] = {}
        self.server: Dict[str, Any] = {}
        self.sources: Dict[str, str] = {}
        self.warnings: List[str] = []

    def set_engine(self, field: str, value: Any, where: str, combine_min: bool = False) -> None:
        value = coerce(value, _ENGINE_TYPES[field], where)
        if combine_min and field in self.engine and self.engine[field] is not None and value is not None:
            if value >= self.engine[field]:
                return
        self.engine[field] = value
        self.sources[f"engine.{field}"] = where

    def set_server(self, field: str, value: Any, where: str) -> None:
        self.server[field] = coerce(value, _SERVER_TYPES[field], where)
        self.sources[f"server.{field}"] = where


def read_yaml_layer(path: str) -> _Layer:
    """Parse a YAML config file into a layer (see the module docstring for the schema)."""
    import yaml

    layer = _Layer("file")
    where = f"file:{path}"
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return layer
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    for key, val in data.items():
        key = str(key)
        if key in _SECTION_KEYS and isinstance(val, dict):
            for sub, sval in val.items():
                sub = str(sub)
                if sub not in _SECTION_KEYS[key]:
                    raise ConfigError(f"config file {path}: unknown key '{key}.{sub}' "
                                      f"(known: {', '.join(sorted(_SECTION_KEYS[key]))})")
                field = _SECTION_KEYS[key][sub]
                if field is None:
                    layer.warnings.append(
                        f"{key}.{sub}={sval!r} has no equivalent in this engine (prefill per step is bounded by "
                        f"max_num_batched_tokens); ignored")
                    continue
                layer.set_engine(field, sval, f"{where}:{key}.{sub}", combine_min=(key, sub) in _MIN_COMBINED)
        elif key == "model" and (val is None or isinstance(val, str)):
            layer.set_engine("model", val, f"{where}:model")
        elif key == "engine" and isinstance(val, dict):
            for sub, sval in val.items():
                if sub not in ENGINE_FIELDS:
                    raise ConfigError(f"config file {path}: unknown key 'engine.{sub}'")
                layer.set_engine(sub, sval, f"{where}:engine.{sub}")
        elif key == "server" and isinstance(val, dict):
            for sub, sval in val.items():
                sub = "api_keys" if sub == "api_key" else sub
                if sub not in SERVER_FIELDS:
                    raise ConfigError(f"config file {path}: unknown key 'server.{sub}'")
                layer.set_server(sub, sval, f"{where}:server.{sub}")
        elif key in ENGINE_FIELDS:
            layer.set_engine(key, val, f"{where}:{key}")
        elif key in SERVER_FIELDS:
            layer.set_server(key, val, f"{where}:{key}")
        else:
            raise ConfigError(f"config file {path}: unknown key '{key}'")
    return layer


def _env_alias_value(field: str, environ: Mapping[str, str]) -> Any:
    """An environment-backed engine field's value from its alias variable, parsed as config.py parses it."""
    try:
        return env_default(field, environ)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_env_layer(environ: Mapping[str, str]) -> _Layer:
    """`YAIE_<FIELD>` for every field, `YAIE_API_KEY(S)`, the seed's variable names and the old variable names
    of environment-backed engine fields (config.ENV_ALIASES)."""
    layer = _Layer("env")
    for var, field in _SEED_ENV.items():            # seed names first: YAIE_ names override them below
        if var in environ:
            layer.set_engine(field, environ[var], f"env:{var}")
    for field, (var, _, _) in sorted(ENV_ALIASES.items()):     # aliases next: YAIE_<FIELD> names win below
        if var in environ and var != f"YAIE_{field.upper()}":
            layer.set_engine(field, _env_alias_value(field, environ), f"env:{var}")
    for field in sorted(ENGINE_FIELDS):
        var = f"YAIE_{field.upper()}"
        if var in environ:
            layer.set_engine(field, environ[var], f"env:{var}")
    for field in sorted(SERVER_FIELDS):
        var = f"YAIE_{field.upper()}"
        if var in environ:
            value = bool(parse_switch(environ[var])) if field in _LENIENT_SERVER_SWITCHES else environ[var]
            layer.set_server(field, value, f"env:{var}")
    if "YAIE_API_KEY" in environ:
        layer.set_server("api_keys", environ["YAIE_API_KEY"], "env:YAIE_API_KEY")
    return layer


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _engine_default_help(f: dataclasses.Field) -> str:
    if f.name in ENV_ALIASES:
        return f"{builtin_default(f.name)!r} (environment: YAIE_{f.name.upper()} or {ENV_ALIASES[f.name][0]})"
    return str(f.default) if f.default is not dataclasses.MISSING else "(computed)"


def build_parser(prog: str = "python -m yaie_jax.serve", add_help: bool = True) -> argparse.ArgumentParser:
    """The serve CLI. Every option defaults to SUPPRESS so only flags actually given form the CLI layer."""
    p = argparse.ArgumentParser(prog=prog, add_help=add_help, argument_default=argparse.SUPPRESS,
                                description="OpenAI-compatible server for yaie_jax. Precedence: flags > env > "
                                            "config file > defaults.")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="model to serve (same as --model)")
    p.add_argument("--config", help="YAML config file (also YAIE_CONFIG)")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("--engine-factory", help=argparse.SUPPRESS)   # dev/test: "module:callable(EngineConfig)"
    eng = p.add_argument_group("engine (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        base, optional = _split_optional(_ENGINE_TYPES[f.name])
        if base is bool:
            eng.add_argument(_flag(f.name), dest=f"engine.{f.name}", action=argparse.BooleanOptionalAction)
        else:
            eng.add_argument(_flag(f.name), dest=f"engine.{f.name}", metavar=base.__name__.upper(),
                             help=f"default: {_engine_default_help(f)}")
    eng.add_argument("--max-batch-size", dest="engine.max_num_seqs", metavar="INT", help="alias of --max-num-seqs")
    eng.add_argument("--gpu-blocks", dest="engine.num_gpu_blocks", metavar="INT", help="alias of --num-gpu-blocks")
    eng.add_argument("--cpu-blocks", dest="engine.num_cpu_blocks", metavar="INT", help="alias of --num-cpu-blocks")
    eng.add_argument("--gpu-memory-util", dest="engine.gpu_memory_utilization", metavar="FLOAT",
                     help="alias of --gpu-memory-utilization")
    eng.add_argument("--enable-radix-cache", dest="engine.enable_prefix_caching",
                     action=argparse.BooleanOptionalAction, help="alias of --enable-prefix-caching")
    srv = p.add_argument_group("server")
    for f in dataclasses.fields(ServerSettings):
        if f.name == "api_keys":
            srv.add_argument("--api-key", dest="server.api_keys", action="append", metavar="KEY",
                             help="accepted API key (repeatable; also YAIE_API_KEY)")
            continue
        base, _ = _split_optional(_SERVER_TYPES[f.name])
        if base is bool:
            srv.add_argument(_flag(f.name), dest=f"server.{f.name}", action=argparse.BooleanOptionalAction)
        else:
            default = f.default if f.default is not dataclasses.MISSING else "[]"
            srv.add_argument(_flag(f.name), dest=f"server.{f.name}", metavar="VALUE", help=f"default: {default}")
    return p


def read_cli_layer(ns: argparse.Namespace) -> _Layer:
    layer = _Layer("cli")
    values = vars(ns)
    if values.get("model_tag") is not None:
        layer.set_engine("model", values["model_tag"], "cli:MODEL")
    for dest, val in values.items():
        if dest.startswith("engine."):
            field = dest[len("engine."):]
            layer.set_engine(field, val, f"cli:{_flag(field)}")
        elif dest.startswith("server."):
            field = dest[len("server."):]
            layer.set_server(field, val, "cli:--api-key" if field == "api_keys" else f"cli:{_flag(field)}")
    return layer


def load_settings(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None, *,
                  parser: Optional[argparse.ArgumentParser] = None) -> Settings:
    """Build the effective settings from `argv` (default: none) and `environ` (default: os.environ).

    Raises `ConfigError` for bad files, variables or flag values, and `ValueError` from `EngineConfig`
    validation (the message names the argument). Argparse errors (unknown flag) exit with status 2.
    """
    settings, _ = parse_args(argv, environ, parser=parser)
    return settings


def parse_args(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None, *,
               parser: Optional[argparse.ArgumentParser] = None) -> Tuple[Settings, argparse.Namespace]:
    """Like `load_settings`, also returning the parsed namespace (for `--print-config`, `--engine-factory`)."""
    environ = os.environ if environ is None else environ
    parser = parser or build_parser()
    ns = parser.parse_args(list(argv or []))
    config_file = getattr(ns, "config", None) or environ.get("YAIE_CONFIG") or None
    layers = []
    if config_file:
        layers.append(read_yaml_layer(config_file))
    layers.append(read_env_layer(environ))
    layers.append(read_cli_layer(ns))
    # environment-backed fields start at their built-in defaults: their variables are read from `environ` above
    # (env layer), not from os.environ by EngineConfig's field defaults
    engine_kwargs: Dict[str, Any] = {field: builtin_default(field) for field in ENV_ALIASES}
    server_kwargs: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    warnings: List[str] = []
    for layer in layers:
        engine_kwargs.update(layer.engine)
        server_kwargs.update(layer.server)
        sources.update(layer.sources)
        warnings.extend(layer.warnings)
    engine = _built(EngineConfig, engine_kwargs, "engine", sources)
    server = _built(ServerSettings, server_kwargs, "server", sources)
    return Settings(engine, server, sources, warnings, config_file), ns


def _built(cls, kwargs: Dict[str, Any], section: str, sources: Dict[str, str]):
    """`cls(**kwargs)`; a refused value's error also names the layer that set it."""
    try:
        return cls(**kwargs)
    except ValueError as e:       # InvalidArgumentError / ConfigError name their field
        field = getattr(e, "field", None)
        where = sources.get(f"{section}.{field}") if field else None
        raise ConfigError(f"{e}" + (f" (set by {where})" if where else ""), field=field) from None


__all__ = ["ServerSettings", "Settings", "ConfigError", "load_settings", "parse_args", "build_parser",
           "read_yaml_layer", "read_env_layer", "coerce"]
