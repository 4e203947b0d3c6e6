"""``blockdiff config show``: every config section and field with its type, default and description.

Generated from the schema in ``config/schema.py`` (the dataclass fields and their ``help`` metadata), so the
listing is always the set of fields a YAML file may set. With ``-c FILE`` (and ``--section.field value``
overrides) it shows the loaded values instead of the defaults and marks those that differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from blockdiff.config.schema import SECTIONS, Config, load_config
from blockdiff.errors import ConfigError

_NAMES = {bool: "bool", int: "int", float: "float", str: "str", dict: "mapping"}
_ALIGN = 40  # the comments' column, unless a section's settings are all shorter


def type_name(tp) -> str:
    """Short YAML-side name of a field type: ``int | null``, ``auto|sdpa|flex``, ``list[str]``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args if a is not type(None)) + " | null"
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    return _NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _yaml_value(v) -> str:
    """A value as it would be written in a YAML config (flow style, one line)."""
    plain = list(v) if isinstance(v, tuple) else v
    text = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("\n...").strip()


def describe(cfg: Config | None = None) -> list[dict]:
    """One entry per field, in schema order: section, field, type, default, value, changed, required, help.

    ``value`` is ``cfg``'s (the default without one); ``changed``: it differs from the default."""
    defaults = Config()
    out = []
    for sname, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, sname), f.name)
            value = getattr(getattr(cfg or defaults, sname), f.name)
            out.append({"section": sname, "field": f.name, "type": type_name(hints[f.name]),
                        "default": default, "value": value, "changed": value != default,
                        "required": bool(f.metadata.get("required")), "help": f.metadata.get("help", "")})
    return out


def render(entries: list[dict], source: str | None) -> str:
    """The listing as a YAML config (every field at its value) with ``# type; description`` comments."""
    head = (f"# values from {source}; '*': differs from the default" if source else
            "# every config field at its default; set them in the YAML file or as --section.field VALUE")
    lines, section = [head, "# field: value  # type; description"], None
    for e in entries:
        if e["section"] != section:
            section = e["section"]
            mine = [x for x in entries if x["section"] == section]
            width = min(max(len(x["field"]) + len(_yaml_value(x["value"])) for x in mine) + 2, _ALIGN)
            lines += ["", f"{section}:"]
        setting = f"{e['field']}: {_yaml_value(e['value'])}"
        mark = "* " if e["changed"] else ""
        note = f" [default: {_yaml_value(e['default'])}]" if e["changed"] else ""
        note += " (required)" if e["required"] else ""
        lines.append(f"  {setting:<{width}}  # {mark}{e['type']}; {e['help']}{note}")
    return "\n".join(lines) + "\n"


def _json_ready(e: dict) -> dict:
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {"name": f"{e['section']}.{e['field']}", **{k: plain(v) for k, v in e.items()}}


def cli_config(argv) -> None:
    """``blockdiff config <subcommand>``: ``show``."""
    if not argv or argv[0] != "show":
        got = f"unknown config command {argv[0]!r}" if argv else "no config command"
        raise ConfigError(f"{got}; expected: blockdiff config show [-c FILE] [--section.field VALUE ...] [--json]")
    p = argparse.ArgumentParser(prog="blockdiff config show",
                                description="every config section and field: type, default (or the loaded "
                                            "value with -c) and a one-line description")
    p.add_argument("-c", "--config", default=None, help="YAML config file: show its values, mark the changed ones")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per field")
    args, overrides = p.parse_known_args(argv[1:])
    cfg = load_config(args.config, overrides) if args.config is not None or overrides else None
    entries = describe(cfg)
    if args.json:
        json.dump([_json_ready(e) for e in entries], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        source = args.config if args.config is not None else ("<defaults + command line>" if overrides else None)
        sys.stdout.write(render(entries, source))
