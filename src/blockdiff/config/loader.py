"""Generic typed-YAML machinery: dataclass sections from YAML + ``--section.field value`` overrides.

Every bad value becomes one ``ConfigError`` that names the file (or the CLI flag), the YAML line of the
offending key, the dotted field and what was expected. Type checking is driven by the dataclass
annotations; each section's ``checks()`` (and the root's ``cross_checks()``) add the range rules.
The sections themselves live in ``config/schema.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from dataclasses import field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from blockdiff.errors import ConfigError


def option(default, help: str, **meta):
    """A config field with its one-line description (``blockdiff config show``); a list default is copied."""
    meta = {"help": help, **meta}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def range_check(obj, name, gt=None, ge=None, lt=None, le=None):
    """(name, message-or-None) for a numeric bound check; None values pass (optional fields)."""
    v = getattr(obj, name)
    bounds = [(">", gt, lambda a, b: a > b), (">=", ge, lambda a, b: a >= b),
              ("<", lt, lambda a, b: a < b), ("<=", le, lambda a, b: a <= b)]
    bounds = [(sym, b, op) for sym, b, op in bounds if b is not None]
    if v is None or all(op(v, b) for _, b, op in bounds):
        return name, None
    return name, f"expected a value {' and '.join(f'{s} {b}' for s, b, _ in bounds)}, got {v!r}"


# ----------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` (PyYAML would return a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _key_lines(node, prefix, out, source):
    """Map dotted keys -> 1-based line of the key; flag duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            continue
        dotted = f"{prefix}{k.value}"
        if dotted in out:
            raise ConfigError(f"duplicate key '{k.value}' (first at line {out[dotted]})",
                              file=source, line=k.start_mark.line + 1, field=dotted)
        out[dotted] = k.start_mark.line + 1
        _key_lines(v, dotted + ".", out, source)


def read_yaml(path) -> tuple[Any, dict[str, int]]:
    """(top-level mapping, dotted key -> line) of a YAML file; a missing file or bad YAML is a ConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a YAML file" if os.path.isdir(path) else "not found"
        raise ConfigError(f"config file {what} (cwd: {os.getcwd()})", file=path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            lines: dict[str, int] = {}
            _key_lines(node, "", lines, path)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=path,
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, {_got(data)}", file=path, line=1)
    return data, lines


# ----------------------------------------------------------------------------------------- typing
def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping", Any: "any value"}.get(origin or tp, str(tp))


def _got(v) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", tuple: "list",
            dict: "mapping", type(None): "null"}.get(type(v), type(v).__name__)
    return f"got {kind} {v!r}" if v is not None else "got null"


class _Mismatch(Exception):
    pass


def _need(ok: bool) -> None:
    if not ok:
        raise _Mismatch


def _coerce(value, tp):
    """Return ``value`` checked against ``tp`` (int -> float, list -> tuple); raise _Mismatch otherwise."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or (value is None and type(None) in args):
        return value
    if origin in (Union, types.UnionType):
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        _need(any(type(value) is type(a) and value == a for a in args))
        return value
    if origin is list:
        _need(isinstance(value, list))
        return [_coerce(v, args[0]) for v in value]
    if origin is tuple:
        _need(isinstance(value, (list, tuple)) and len(value) == len(args))
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if tp is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool))
        return float(value)
    _need(isinstance(value, origin or tp) and not (tp is int and isinstance(value, bool)))
    return value


# ----------------------------------------------------------------------------------------- building
class Where:
    """Turns a dotted field into a located ConfigError (file + line, or the CLI flag that set it)."""

    def __init__(self, source, lines=None, overridden=()):
        self.source, self.lines, self.overridden = source, lines or {}, set(overridden)

    def error(self, dotted: str, msg: str) -> ConfigError:
        if dotted in self.overridden:
            return ConfigError(msg, file=f"--{dotted}")
        section = dotted.split(".")[0]
        line = self.lines.get(dotted, self.lines.get(section))
        return ConfigError(msg, file=self.source, line=line, field=dotted)


def suggest(name, known, listing=True) -> str:
    """`` (did you mean 'x'?)`` for a close match, else `` (known: a, b)`` (or nothing without ``listing``)."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(known)})" if listing else ""


def section_types(root: type) -> dict[str, type]:
    """Section name -> section dataclass of a root config dataclass."""
    return {f.name: get_type_hints(root)[f.name] for f in dataclasses.fields(root)}


def build(root: type, d, where: Where, moved: dict[str, str] | None = None):
    """A checked ``root`` dataclass from a nested dict (sections -> fields); ``moved``: old dotted -> new."""
    sections_of, moved = section_types(root), moved or {}
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, {_got(d)}", file=where.source, line=1)
    sections = {}
    for sname, body in d.items():
        if sname not in sections_of:
            raise where.error(str(sname), f"unknown section '{sname}'{suggest(str(sname), sections_of)}")
        cls = sections_of[sname]
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise where.error(sname, f"section '{sname}' must be a mapping of field: value, {_got(body)}")
        hints = get_type_hints(cls)
        kwargs = {}
        for fname, value in body.items():
            dotted = f"{sname}.{fname}"
            if fname not in hints:
                hint = f" (set {moved[dotted]})" if dotted in moved else suggest(str(fname), hints)
                raise where.error(dotted, f"unknown field '{fname}' in section '{sname}'{hint}")
            try:
                kwargs[fname] = _coerce(value, hints[fname])
            except _Mismatch:
                msg = f"expected {_describe(hints[fname])}, {_got(value)}"
                if get_origin(hints[fname]) is Literal and isinstance(value, str):
                    msg += suggest(value, get_args(hints[fname]), listing=False)
                elif "a string" in _describe(hints[fname]) and dotted in where.overridden:
                    msg += f" (to pass it as a string, quote it: --{dotted}='\"{value}\"')"
                raise where.error(dotted, msg) from None
        sections[sname] = cls(**kwargs)
    cfg = root(**sections)
    _validate(cfg, where)
    cfg._where = where  # kept so later checks (apply_world_size, validate) can point at the same lines
    return cfg


def _validate(cfg, where: Where) -> None:
    for s in dataclasses.fields(cfg):
        sec = getattr(cfg, s.name)
        for f in dataclasses.fields(sec):
            if f.metadata.get("required") and not getattr(sec, f.name):
                raise where.error(f"{s.name}.{f.name}", f"required field is missing or empty: set {s.name}.{f.name}")
        for fname, msg in sec.checks():
            if msg:
                raise where.error(f"{s.name}.{fname}", msg)
    for dotted, msg in cfg.cross_checks():
        raise where.error(dotted, msg)


# ----------------------------------------------------------------------------------------- CLI overrides
def _parse_value(text: str):
    try:
        return yaml.load(text, Loader=_Loader) if text != "" else ""
    except yaml.YAMLError:
        return text  # e.g. an odd path; the type check says what was expected


def parse_overrides(argv, sections=()) -> list[tuple[str, Any]]:
    """``["--a.b", "1", "--c.d=[1,2]", "--e.f"]`` -> ``[("a.b", 1), ("c.d", [1, 2]), ("e.f", True)]``.

    Values are YAML scalars/lists; a flag with no value means ``true``; dashes in names become underscores.
    ``sections`` (names) only feed the message for a flag without a section.
    """
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override '--section.field value' or '--section.field=value', got {arg!r}",
                              file="<command line>")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        key = key.replace("-", "_")
        if "." not in key or "" in key.split("."):
            raise ConfigError(f"expected '--section.field', e.g. '--optimizer.lr' (sections: {', '.join(sections)})",
                              file=f"--{key}")
        out.append((key, _parse_value(value)))
        i += 1
    return out


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    node = d
    for j, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{'.'.join(parts[j + 1:])}' inside {'.'.join(parts[:j + 1])}, "
                              f"which is not a mapping ({_got(nxt)})", file=f"--{key}")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict, pairs, sections) -> set[str]:
    """Set each ``(dotted key, value)`` in ``data`` (in place); return the ``section.field`` names set."""
    overridden = set()
    for key, value in pairs:
        section = key.split(".")[0]
        if section not in sections:
            raise ConfigError(f"unknown section '{section}'{suggest(section, sections)}", file=f"--{key}")
        if data.get(section) is None:
            data[section] = {}
        _set_dotted(data, key, value)
        overridden.add(".".join(key.split(".")[:2]))
    return overridden
