"""Reading a sweep file: TOML in, plain data out, with `--set` overrides applied.

TOML has dates and times, which no key of a sweep takes; every way a file can fail to read is one
SweepError line naming the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import tomllib
from pathlib import Path

from jaxgrok import registry
from jaxgrok.models import MLPConfig
from jaxgrok.sweep.axes import AXES, SweepError
from jaxgrok.sweep.config import GrokkingConfig, MeasuresConfig, TrainConfig
from jaxgrok.tasks import TaskConfig


def safe_name(stem: str) -> str:
    """A file's stem as a default sweep name: characters outside the safe set become _."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100].lstrip(".")
    return name or "sweep"



def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def _tables_with(key: str, raw: dict) -> list[str]:
    """The tables where a bare `--set KEY=...` could belong: where the file has it, else the schema."""
    present = [t for t, v in raw.items() if isinstance(v, dict) and key in v]
    if present:
        return present

    def named(what, default):  # the class of the file's task or model, if it names a known one
        name = raw.get(what, {}).get(registry.NAME_KEY[what]) if isinstance(raw.get(what), dict) else None
        if not isinstance(name, str):
            return default
        try:
            return registry.lookup(what, name) or default
        except ValueError:  # a broken entry point: said when the sweep is validated
            return default

    schema = {
        "task": named("task", TaskConfig), "train": TrainConfig,
        "grokking": GrokkingConfig, "measures": MeasuresConfig, "model": named("model", MLPConfig),
    }
    found = [t for t, cls in schema.items() if key in {f.name for f in dataclasses.fields(cls)}]
    return found + (["sweep"] if key in AXES else [])


def _split_override(item) -> tuple[str, object]:
    """("KEY", value) from "KEY=VALUE" (the value read as TOML), or from a (key, value) pair (Python)."""
    if isinstance(item, tuple):
        return str(item[0]).strip(), item[1]
    key, sep, text = str(item).partition("=")
    if not sep or not key.strip():
        raise SweepError(f"--set {item}: expected KEY=VALUE")
    return key.strip(), _parse_value(text)


def overrides_id(overrides) -> str:
    """A short name for a set of overrides (their order aside): an overridden sweep's own folder."""
    pairs = sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in map(_split_override, overrides))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:8]


def apply_overrides(raw: dict, overrides: list, where: str) -> dict:
    """`--set train.steps=500`, or `--set steps=500` when the key belongs to one table only. An
    override is "KEY=VALUE" (VALUE in TOML) or, from Python, a (KEY, value) pair."""
    try:
        raw = json.loads(json.dumps(raw))  # a deep copy of plain TOML data
    except (TypeError, ValueError) as e:  # a dict from Python holding something TOML cannot say
        raise SweepError(f"{where}: not plain TOML data ({e})") from None
    for item in overrides:
        try:
            key, value = _split_override(item)
        except SweepError as e:
            raise SweepError(f"{where}: {e}") from None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", key):
            raise SweepError(f"{where}: --set {item}: KEY is NAME or TABLE.NAME (letters, digits, _)")
        if "." in key:
            table, key = key.split(".", 1)
        elif key in ("name", "paper", "description"):
            table = None
        else:
            owners = _tables_with(key, raw)
            if len(owners) != 1:
                problem = "no such key" if not owners else f"ambiguous ({', '.join(owners)})"
                raise SweepError(f"{where}: --set {key}: {problem}; write TABLE.KEY")
            table = owners[0]
        target = raw if table is None else raw.setdefault(table, {})
        if not isinstance(target, dict):
            raise SweepError(f"{where}: --set {table}.{key}: {table} is not a table")
        target[key] = value
        _no_dates(target[key], where, f"--set {key}")
    return raw


def _no_dates(value, where: str, key: str = "") -> None:
    """TOML has dates and times; no key of a sweep takes one. `where` names the file."""
    if isinstance(value, (datetime.date, datetime.time)):
        raise SweepError(f"{where}: {key}: must not be a date or a time, got {value.isoformat()}")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_dates(v, where, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for v in value:
            _no_dates(v, where, key)


def read_toml(path: Path) -> dict:
    """A TOML file as a dict; every way it can fail is one SweepError line naming the file."""
    where = str(path)
    if not path.exists():
        raise SweepError(f"{where}: no such file")
    if not path.is_file():  # a directory, a FIFO (reading it would block), a device
        raise SweepError(f"{where}: not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SweepError(f"{where}: cannot read ({e.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says where, not what (a duplicate key is "Cannot overwrite a value"): show the line.
        line = re.search(r"line (\d+)", str(e))
        shown = ""
        if line and 0 < int(line.group(1)) <= len(text.splitlines()):
            shown = f": {text.splitlines()[int(line.group(1)) - 1].strip()[:80]!r}"
        raise SweepError(f"{where}: not valid TOML ({e}){shown}") from None
    _no_dates(raw, where)
    return raw
