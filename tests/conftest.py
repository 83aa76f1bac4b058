"""Tests run on 8 simulated CPU devices, so sharding is exercised on every machine."""

import json
import os
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # must precede jax's initialisation
# Tests compile the same small programs many times over (and in subprocesses, which inherit this):
# XLA's persistent cache, fresh for each session, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxgrok-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))

from jaxgrok.sweep import sweep_from_dict  # noqa: E402


def make_raw(**sections):
    """A small sweep as a dict: the MLP on x+y mod 31, overridable per table."""
    raw = {
        "name": "tiny",
        "paper": "test fixture",
        "task": {"op": "x+y", "p": 31},
        "model": {"kind": "mlp"},
        "train": {"steps": 200, "eval_every": 50, "chunk_steps": 100},
        "sweep": {"seed": [0, 1, 2], "weight_decay": [1.0, 2.0], "learning_rate": 1e-2, "train_fraction": 0.5},
    }
    for table, values in sections.items():
        if table in ("train", "grokking") and isinstance(values, dict):  # merged; others replaced
            raw[table] = {k: v for k, v in {**raw[table], **values}.items() if v is not None}  # None: drop
        else:
            raw[table] = values
    return raw


def toml_value(v) -> str:
    """A value as TOML; a string "RAW:text" is written as the bare text (a TOML date or time)."""
    if isinstance(v, str):
        return v[4:] if v.startswith("RAW:") else json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)  # ints, and floats: inf, -inf and nan are TOML too


def write_raw(path, raw: dict):
    """A sweep as a dict written as a TOML file at `path`; returns the path."""
    lines = [f"{k} = {toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for table, body in raw.items():
        if isinstance(body, dict):
            lines += [f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sweep(path, **sections):
    """make_raw(**sections) written as a TOML sweep file at `path`; returns the path."""
    return write_raw(path, make_raw(**sections))


@pytest.fixture
def tiny_sweep():
    return lambda **sections: sweep_from_dict(make_raw(**sections), "tiny.toml")
