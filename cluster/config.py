"""ServeConfig: the typed, validated configuration of one dsv4-serve application.

Owns: the option names, their types, defaults and ranges, and the translation of the whole
config into the smaller configs of the parts (`EngineConfig`, KV-cache options). `serve run` /
`serve deploy` pass `args` (a dict of JSON values) to `cluster.app:build_app`, which calls
`ServeConfig.from_args`; an unknown option or a wrong type fails there with a message naming
the option, before any replica starts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any
from dataclasses import dataclass

from actors.engine import EngineConfig

V4_MODEL_IDS = ("deepseek-v4-pro", "deepseek-v4-flash")
RETIRED_MODEL_IDS = {"deepseek-chat": "deepseek-v4-flash", "deepseek-reasoner": "deepseek-v4-flash"}
RETIRED_ON = "2026-07-24"


class ConfigError(ValueError):
    """An invalid ServeConfig option (the message names it)."""


@dataclass(frozen=True)
class ServeConfig:
    # model
    model: str | None = None                 # checkpoint dir; None = the embedded tiny checkpoint
    tiny_cache_dir: str | None = None        # where the tiny checkpoint is generated (default ~/.cache)
    served_model_names: tuple[str, ...] = V4_MODEL_IDS
    # placement
    num_replicas: int = 1                    # Engine replicas (each: one router + its shards)
    num_ingress_replicas: int = 1
    num_expert_shards: int = 0               # 0 = all experts in the Engine process (LocalRunner)
    micro_batches: int = 1
    transport: str = "collective"            # actors.launch: "collective" (torch.distributed) or "ray"
    engine_num_cpus: float = 1.0
    engine_num_gpus: float = 0.0
    device: str = "auto"                     # the Engine's weights: "auto" (CUDA if it sees a GPU), "cpu", "cuda"
    dtype: str = "auto"                      # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16"
    cuda_graphs: bool = True                 # replay decode steps from CUDA graphs where the model allows
    compiled_decode: str = "auto"            # decode layers as compiled regions: "auto" (on with CUDA graphs), "on", "off"
    ingress_num_cpus: float = 0.0
    # engine
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_num_waiting: int = 256
    max_model_len: int = 0                   # 0 = the model's max_position_embeddings
    default_max_tokens: int = 4096           # when a request gives no max_tokens
    # KV cache
    kv_enabled: bool = True
    kv_redis_url: str | None = None
    kv_dir: str | None = None
    kv_device_bytes: int = 1 << 30
    kv_block_tokens: int = 128
    kv_checkpoint_tokens: int = 4096
    kv_fp8: bool = False
    kv_restore_threads: int = 0              # threads of a restore's verify + copy; 0: min(4, usable CPUs)
    # API
    api_key: str | None = None               # required as Bearer / x-api-key when set
    max_body_bytes: int = 8 << 20
    max_messages: int = 4096
    max_n: int = 16
    thinking_ignores_sampling: bool = True   # DeepSeek: temperature / top_p have no effect when thinking
    affinity_tokens: int = 1024              # prompt tokens hashed for replica affinity
    is_test_hooks_enabled: bool = False      # forced completions + debug fields (tests only)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: dict | None) -> "ServeConfig":
        args = dict(args or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(name, hints[name], value) for name, value in args.items()}
        config = cls(**values).validate()
        model = config.model
        if model and not os.path.isfile(os.path.join(model, "config.json")):
            # Checked where the app is built; the path must be the same wherever replicas run.
            raise ConfigError(f"model {model!r}: no config.json in that directory (expected a checkpoint)")
        return config

    def validate(self) -> "ServeConfig":
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(len(self.served_model_names) >= 1, "served_model_names must name at least one model")
        for name in self.served_model_names:
            check(isinstance(name, str) and name and name not in RETIRED_MODEL_IDS,
                  f"served_model_names: {name!r} is not a servable model id")
        for name in ("num_replicas", "num_ingress_replicas", "micro_batches", "max_num_seqs",
                     "max_num_batched_tokens", "default_max_tokens", "max_body_bytes", "max_messages",
                     "max_n", "affinity_tokens", "kv_checkpoint_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_expert_shards", "max_num_waiting", "max_model_len", "kv_device_bytes",
                     "engine_num_cpus", "engine_num_gpus", "ingress_num_cpus", "kv_restore_threads"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.kv_block_tokens >= 128 and self.kv_block_tokens % 128 == 0,
              f"kv_block_tokens must be a positive multiple of 128, got {self.kv_block_tokens}")
        check(self.transport in ("collective", "ray"), f"transport must be 'collective' or 'ray', got {self.transport!r}")
        check(self.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        check(self.dtype in ("auto", "float32", "bfloat16"),
              f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        check(self.compiled_decode in ("auto", "on", "off"),
              f"compiled_decode must be 'auto', 'on' or 'off', got {self.compiled_decode!r}")
        check(self.api_key is None or len(self.api_key) >= 1, "api_key must be non-empty when set")
        check(self.model is None or isinstance(self.model, str), "model must be a path")
        try:
            self.engine_config()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return self

    # ---- derived configs ---------------------------------------------------------------------
    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                            max_num_waiting=self.max_num_waiting, max_model_len=self.max_model_len,
                            is_test_hooks_enabled=self.is_test_hooks_enabled).validate()

    def resolve_device(self) -> tuple[str, Any]:
        """(device, dtype) for the Engine's weights, in the process that loads them (a Ray actor
        with num_gpus > 0 sees its GPU). Asking for "cuda" where there is none is an error."""
        import torch

        has_cuda = torch.cuda.is_available()
        if self.device == "cuda" and not has_cuda:
            raise ConfigError("device 'cuda': this process sees no GPU (set engine_num_gpus >= 1 on a GPU node)")
        device = "cuda" if self.device == "cuda" or (self.device == "auto" and has_cuda) else "cpu"
        name = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        return device, getattr(torch, name)

    def is_compiled_decode(self, device: str) -> bool:
        """Whether the Engine's decode steps run as compiled regions (model_shards.regions): "auto"
        turns them on where decode steps replay CUDA graphs (there the compile runs once at load;
        on CPUs it costs ~40 s of start-up for a ~20% faster decode, so it is opt-in)."""
        if self.compiled_decode != "auto":
            return self.compiled_decode == "on"
        return device == "cuda" and self.cuda_graphs

    def kv_options(self) -> dict:
        return dict(device_bytes=self.kv_device_bytes, block_tokens=self.kv_block_tokens,
                    checkpoint_tokens=self.kv_checkpoint_tokens, is_fp8=self.kv_fp8,
                    restore_threads=self.kv_restore_threads or None)

    def resolve_model_path(self) -> str:
        """The checkpoint directory, generating the embedded tiny checkpoint if none is set."""
        if self.model:
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise ConfigError(f"model {self.model!r}: no config.json in that directory")
            return self.model
        from cluster.tiny_checkpoint import ensure_tiny_checkpoint
        return ensure_tiny_checkpoint(self.tiny_cache_dir)

    def to_args(self) -> dict:
        out = dataclasses.asdict(self)
        out["served_model_names"] = list(self.served_model_names)
        return out


def _coerce(name: str, hint, value):
    """Check `value` against the field's type; ints are accepted for floats, lists for tuples."""
    origin, targs = typing.get_origin(hint), typing.get_args(hint)
    is_optional = origin in (typing.Union, types.UnionType) and type(None) in targs
    if is_optional:
        if value is None:
            return None
        hint = next(a for a in targs if a is not type(None))
        origin, targs = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported option type {hint!r}")  # pragma: no cover

