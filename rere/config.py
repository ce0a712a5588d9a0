"""Load, merge, validate and save the configuration.

The schema in workflow/schemas/config.schema.yaml is the single description of every key;
the same file is validated by the Snakefile, so the CLI and the workflow cannot disagree.
Defaults come from the schema, so a config file only needs the keys it changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from rere import RereError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"


def _schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _with_defaults(validator_class):
    """A validator that fills each missing property with its schema `default` (then validates it)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def _blame(error: jsonschema.ValidationError, extra: list[str], overrides: dict[tuple, str]) -> str | None:
    """The `--set KEY=VALUE` argument that put the offending value there, if one did."""
    path = [str(p) for p in error.absolute_path]
    for keys, item in reversed(overrides.items()):  # the last --set of a key wins
        keys = list(keys)
        if keys == path[: len(keys)] or (keys[:-1] == path and keys[-1] in extra):
            return item
    return None


def validate(config: dict, source: str = "config", overrides: dict[tuple, str] | None = None) -> dict:
    """Fill defaults in place and validate; raise RereError naming the key on the first problem.

    `overrides` maps each `--set` key path to its argument, so an error in a value that came
    from the command line names that argument rather than the config file.
    """
    overrides = overrides or {}
    schema = _schema()
    validator = _Validator(schema)
    # Defaults inside `additionalProperties` entries (datasets, rl.variants) are filled by the
    # same hook because each entry is validated against a schema with `properties`.
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        extra: list[str] = []
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            allowed = ", ".join(sorted(e.schema.get("properties", {})))
            msg = f"unknown key {extra} under '{_where(e)}' (allowed: {allowed})"
        elif e.validator in ("anyOf", "oneOf") and "description" in e.schema:
            msg = f"key '{_where(e)}': {e.instance!r} is not allowed ({e.schema['description'].rstrip('.')})"
        else:
            msg = f"key '{_where(e)}': {e.message}"
        item = _blame(e, extra, overrides)
        where = f"--set {item}" if item is not None else source
        raise RereError(f"{where}: {msg}. Fix the value or see {SCHEMA_PATH.name} for the allowed keys.")
    if overrides:
        source += " with " + " ".join(f"--set {item}" for item in overrides.values())
    _cross_checks(config, source)
    return config


def check_cutoffs(ev: dict, source: str) -> None:
    """evaluate.ks must fit in the B beams: a list of B items cannot be cut at K > B."""
    too_big = [k for k in ev["ks"] if k > ev["num_beams"]]
    if too_big:
        raise RereError(
            f"{source}: key 'evaluate.ks' has {too_big} larger than evaluate.num_beams="
            f"{ev['num_beams']}; raise num_beams or drop those cut-offs."
        )


def _cross_checks(config: dict, source: str) -> None:
    check_cutoffs(config["evaluate"], source)
    for name, ds in config["datasets"].items():
        if ds["source"] == "amazon" and not ds.get("category"):
            raise RereError(
                f"{source}: key 'datasets.{name}.category' is required for source amazon (e.g. Office_Products)."
            )
        if ds["source"] == "d3" and not ds.get("path"):
            raise RereError(
                f"{source}: key 'datasets.{name}.path' is required for source d3 (a folder with train/valid/test.csv and info.txt)."
            )
    clash = sorted(set(config["rl"]["variants"]) & ({"base", "sft"} | set(config["baselines"]["methods"])))
    if clash:
        raise RereError(
            f"{source}: key 'rl.variants' has {clash}, which are also stage or baseline names; "
            "rename those variants (they name model and results folders)."
        )
    if config["model"]["init"] == "pretrained" and not config["model"]["name_or_path"]:
        raise RereError(f"{source}: key 'model.name_or_path' is required when model.init is pretrained.")


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RereError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set sft.max_steps=10")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RereError(f"--set {item!r}: the value is not valid YAML ({exc.problem or exc}).") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; a user means the number
            value = float(value) if value.strip().lower() not in {"nan", "inf", "-inf", "infinity"} else value
        except ValueError:
            pass
    return key.split("."), value


def load_config(paths: list[str | Path] | None = None, overrides: list[str] | None = None) -> dict:
    """Read YAML files in order (later files override earlier ones), apply KEY=VALUE overrides,
    fill defaults and validate. With no path, the embedded default config/config.yaml is used.
    """
    paths = [Path(p) for p in (paths or [DEFAULT_CONFIG])]
    config: dict = {}
    for p in paths:
        if not p.is_file():
            raise RereError(f"config file {p} does not exist; pass --config PATH to an existing YAML file.")
        try:
            with open(p, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise RereError(f"config file {p} is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            from rere.io import not_utf8

            raise not_utf8(p) from None
        if not isinstance(data, dict):
            raise RereError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}.")
        # A dataset list in a later file replaces the earlier one rather than merging into it,
        # so a config can run fewer datasets than the default.
        if "datasets" in data:
            config.pop("datasets", None)
        config = deep_merge(config, data)
    given: dict[tuple, str] = {}
    for item in overrides or []:
        keys, value = _parse_override(item)
        given.pop(tuple(keys), None)
        given[tuple(keys)] = item
        node = config
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RereError(f"--set {item!r}: '{k}' is not a section.")
        node[keys[-1]] = value
    source = " + ".join(str(p) for p in paths)
    return validate(config, source, given)


def schema_defaults(*keys: str) -> dict:
    """The schema's defaults for the section at `keys`, e.g. schema_defaults("model", "scratch")."""
    node = _schema()
    for k in keys:
        node = node["properties"][k]
    return {name: copy.deepcopy(sub["default"]) for name, sub in node["properties"].items() if "default" in sub}


def dataset_config(config: dict, name: str) -> dict:
    if name not in config["datasets"]:
        known = ", ".join(config["datasets"])
        raise RereError(f"dataset '{name}' is not in the config's datasets ({known}).")
    return config["datasets"][name]


def variant_config(config: dict, name: str) -> dict:
    variants = config["rl"]["variants"]
    if name not in variants:
        raise RereError(f"RL variant '{name}' is not in rl.variants ({', '.join(variants)}).")
    return variants[name]


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out
