"""Typed access to a decoded JSON request body, raising 400 `APIError`s that name the field.

Owns no state. Both APIs parse their bodies with `Body` instead of pydantic / FastAPI models,
so every schema error is a 400 in the API's own error shape with a precise message (FastAPI's
default would be a 422 with its own body).
"""

from __future__ import annotations

from typing import Any

from cluster.errors import invalid

_MISSING = object()


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


class Body:
    def __init__(self, data: Any, where: str = ""):
        if not isinstance(data, dict):
            raise invalid(f"{where or 'the request body'} must be a JSON object, got {_kind(data)}")
        self.data = data
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        v = self.data.get(key)
        return default if v is None else v

    def _get(self, key: str, required: bool) -> Any:
        v = self.data.get(key, _MISSING)
        if v is _MISSING or v is None:
            if required:
                raise invalid(f"'{self._name(key)}' is required", self._name(key))
            return _MISSING
        return v

    def str(self, key: str, default: Any = None, *, required: bool = False,
            choices: tuple[str, ...] | None = None) -> Any:
        v = self._get(key, required)
        if v is _MISSING:
            return default
        if not isinstance(v, str):
            raise invalid(f"'{self._name(key)}' must be a string, got {_kind(v)}", self._name(key))
        if choices is not None and v not in choices:
            raise invalid(f"'{self._name(key)}' must be one of {', '.join(map(repr, choices))}, got {v!r}",
                          self._name(key))
        return v

    def bool(self, key: str, default: bool = False) -> bool:
        v = self._get(key, False)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            raise invalid(f"'{self._name(key)}' must be a boolean, got {_kind(v)}", self._name(key))
        return v

    def int(self, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None,
            required: bool = False) -> Any:
        v = self._get(key, required)
        if v is _MISSING:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"'{self._name(key)}' must be an integer, got {_kind(v)}", self._name(key))
        self._range(key, v, lo, hi)
        return v

    def float(self, key: str, default: Any = None, *, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> Any:
        v = self._get(key, False)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise invalid(f"'{self._name(key)}' must be a number, got {_kind(v)}", self._name(key))
        if lo_open and lo is not None and v <= lo:
            raise invalid(f"'{self._name(key)}' must be > {lo} and <= {hi}, got {v}", self._name(key))
        self._range(key, v, lo, hi)
        return float(v)

    def _range(self, key: str, v, lo, hi) -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (
                f">= {lo}" if lo is not None else f"<= {hi}")
            raise invalid(f"'{self._name(key)}' must be {bounds}, got {v}", self._name(key))

    def list(self, key: str, default: Any = None, *, required: bool = False, max_len: int | None = None,
             non_empty: bool = False) -> Any:
        v = self._get(key, required)
        if v is _MISSING:
            return default
        if not isinstance(v, list):
            raise invalid(f"'{self._name(key)}' must be an array, got {_kind(v)}", self._name(key))
        if non_empty and not v:
            raise invalid(f"'{self._name(key)}' must not be empty", self._name(key))
        if max_len is not None and len(v) > max_len:
            raise invalid(f"'{self._name(key)}' has {len(v)} items; at most {max_len} are allowed",
                          self._name(key))
        return v

    def obj(self, key: str, *, required: bool = False) -> "Body | None":
        v = self._get(key, required)
        if v is _MISSING:
            return None
        if not isinstance(v, dict):
            raise invalid(f"'{self._name(key)}' must be an object, got {_kind(v)}", self._name(key))
        return Body(v, self._name(key))

    def stop_strings(self, key: str, max_len: int = 16) -> tuple[str, ...]:
        v = self._get(key, False)
        if v is _MISSING:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise invalid(f"'{self._name(key)}' must be a string or an array of strings", self._name(key))
        if len(items) > max_len:
            raise invalid(f"'{self._name(key)}' accepts at most {max_len} strings", self._name(key))
        if any(not s for s in items):
            raise invalid(f"'{self._name(key)}' must not contain empty strings", self._name(key))
        return tuple(items)
