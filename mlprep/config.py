"""Config checks before any job starts: the schema (filling defaults) and the input paths it names.

Errors are short: the key, where it is, what is wrong (and the allowed keys for an unknown one),
never the schema or the whole config. Keys whose value is an input path carry `x-path` in
config/schema.yaml (`file`, `dir`, `file-or-tag` for model weights that may be a hub tag, `dir-or-hub`
for a model folder that may be a hub id); they are checked for the pipelines that are enabled.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

MAX_ERRORS = 10


class ConfigError(ValueError):
    """The config is invalid or names an input that does not exist; the message says which key."""


def settings_from_config(cls, cfg: dict | None, section: str, tuples: tuple[str, ...] = ()):
    """A frozen settings dataclass from its config section: unknown keys are an error naming them and the section,
    list values of `tuples` become tuples (hashable, as the dataclass declares them)."""
    from dataclasses import fields

    cfg = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"{section}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    for key in tuples:
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return cls(**cfg)


_PYTHON_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def _coerce(value, schema: dict):
    """A string where the schema wants a number, boolean or null, parsed as YAML when that gives one.

    Snakemake's `--config key='{a: 8}'` reads nested values as strings; this makes them mean what
    they say. Anything else is returned unchanged, for the validator to judge.
    """
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_coerce(v, schema["items"]) for v in value]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and "null" in types and value in ("null", "Null", "NULL", "~"):
        return None
    if not isinstance(value, str) or "string" in types or not types:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    wanted = tuple(_PYTHON_TYPES[t] for t in types if t in _PYTHON_TYPES)
    ok = isinstance(parsed, wanted) and not (isinstance(parsed, bool) and bool not in wanted)
    return parsed if ok else value


def _with_defaults(validator_class):
    """A validator that fills each missing property with its schema default (and coerces command-line
    strings, see _coerce) before validating it."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
                if name in instance:
                    instance[name] = _coerce(instance[name], sub)
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(validator_class, {"properties": properties})


DefaultFillingValidator = _with_defaults(Draft202012Validator)


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "the top level"


def _describe(error) -> str:
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r} in {where} (allowed: {', '.join(allowed)}){hint}")
        return "\n".join(lines)
    return f"{where}: {error.message}"


def load_schema(path: Path | str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def validate(config: dict, schema: dict) -> None:
    """Check `config` against `schema`, filling defaults in place; ConfigError lists what is wrong."""
    errors = sorted(DefaultFillingValidator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [_describe(e) for e in errors[:MAX_ERRORS]]
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ConfigError("config error:\n  " + "\n  ".join("\n".join(lines).splitlines()) + more)


PIPELINES = ("sku_index", "video_frames", "speaker_embed", "kline_factor", "probe_qa")


def only(*pipelines: str) -> dict:
    """Config sections that switch off every pipeline but `pipelines` (a run or test of some of them:
    the others' default inputs are relative paths that need not exist where it runs)."""
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        raise ValueError(f"unknown pipeline(s) {sorted(unknown)}; known: {', '.join(PIPELINES)}")
    return {name: {"enabled": False} for name in PIPELINES if name not in pipelines}


def looks_like_path(value: str) -> bool:
    """Model weights given as a file path rather than a hub tag."""
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def looks_like_hub_id(value: str) -> bool:
    """`org/model`: one slash, no leading dot, slash or tilde."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None


def _path_problem(key: str, value, kind: str) -> str | None:
    if value is None or value == "":
        return None
    if kind == "dir" and str(value).startswith("s3://"):
        return None  # object storage: listed (and its credentials checked) when the DAG is built
    path = Path(str(value))
    if kind == "file-or-tag" and str(value).startswith("packaged:"):
        from mlprep.weights import PackagedWeightsError, packaged_file

        try:
            packaged_file(str(value))
        except PackagedWeightsError as err:
            return f"{key}: {err}"
        return None
    if kind == "file-or-tag":
        if not looks_like_path(str(value)):
            return None  # a hub tag such as laion2b_s34b_b79k
        kind = "file"
    if kind == "dir-or-hub":
        if not path.exists() and looks_like_hub_id(str(value)):
            return None  # a hub id such as speechbrain/spkrec-ecapa-voxceleb
        kind = "dir"
    if kind == "dir" and not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
    elif kind == "file" and not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
    else:
        return None
    relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    return f"{key}: {'folder' if kind == 'dir' else 'file'} {str(value)!r} {what}{relative}"


def input_path_problems(config: dict, schema: dict) -> list[str]:
    """Every `x-path` key of an enabled pipeline whose file or folder is missing."""
    problems: list[str] = []

    def walk(values: dict, props: dict, prefix: str) -> None:
        for name, sub in props.items():
            value = values.get(name)
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub["properties"], f"{prefix}{name}.")
            elif "x-path" in sub:
                problem = _path_problem(f"{prefix}{name}", value, sub["x-path"])
                if problem:
                    problems.append(problem)

    for section, sub in schema.get("properties", {}).items():
        values = config.get(section)
        if isinstance(values, dict) and "properties" in sub and values.get("enabled", True):
            walk(values, sub["properties"], f"{section}.")
    return problems


def check_config(config: dict, schema_path: Path | str) -> None:
    """Schema (with defaults) first, then the input paths; ConfigError names every bad key."""
    schema = load_schema(schema_path)
    validate(config, schema)
    problems = input_path_problems(config, schema)
    if problems:
        raise ConfigError("config error: input not found\n  " + "\n  ".join(problems))
