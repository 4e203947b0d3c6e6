"""Validation of one chat row, with an error that names the exact field.

Row format (OpenAI chat messages, as the Gemma 4 template renders them)::

    {"tools": [{"type": "function", "function": {"name": "add", "description": "...",
                                                  "parameters": {<JSON schema>}}}, ...],   # optional
     "messages": [
        {"role": "system" | "developer", "content": "..."},                   # optional, first only
        {"role": "user", "content": "..."},
        {"role": "assistant", "content": "...", "reasoning_content": "...",   # reasoning: optional
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},               # or "name": "add"
        {"role": "assistant", "content": "..."}]}

Order: after the optional system/developer turn, user turns and assistant turns alternate starting with
user; an assistant turn with ``tool_calls`` is followed by one ``tool`` turn per answer, then the assistant
continues. The last turn is the assistant's (the supervised one) with text or tool calls. ``arguments``
may be a JSON object or a string holding one (decoded here: the template renders objects only).
Validated rows are normalised to exactly these fields.
"""

from __future__ import annotations

import json
from typing import Any

from blockdiff.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    def __init__(self, file, line):
        self.file, self.line = file, line

    def fail(self, msg: str, field: str | None) -> DataError:
        return DataError(msg, file=self.file, line=self.line, field=field)

    def text(self, obj: dict, key: str, where: str, optional: bool = False) -> str | None:
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None
            raise self.fail("missing; expected a string", f"{where}.{key}")
        if not isinstance(obj[key], str):
            raise self.fail(f"expected a string, got {_type_name(obj[key])}", f"{where}.{key}")
        return obj[key]

    def mapping(self, value, where: str, what: str = "an object") -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"expected {what}, got {_type_name(value)}", where)
        return value

    def tool_call(self, call, where: str) -> dict:
        call = self.mapping(call, where, "an object with 'function'")
        if call.get("type", "function") != "function":
            raise self.fail(f"expected 'function', got {call['type']!r}", f"{where}.type")
        function = self.mapping(call.get("function"), f"{where}.function", "an object with 'name' and 'arguments'")
        name = self.text(function, "name", f"{where}.function")
        if not name.strip():
            raise self.fail("empty function name", f"{where}.function.name")
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise self.fail(f"not valid JSON ({e.msg} at column {e.colno}); expected a JSON object",
                                f"{where}.function.arguments") from None
        if args is None:
            args = {}
        self.mapping(args, f"{where}.function.arguments", "a JSON object of named arguments")
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if "id" in call:
            out["id"] = self.text(call, "id", where)
        return out

    def tool(self, tool, where: str) -> dict:
        tool = self.mapping(tool, where, "an object with 'function'")
        if tool.get("type", "function") != "function":
            raise self.fail(f"expected 'function', got {tool['type']!r}", f"{where}.type")
        function = self.mapping(tool.get("function"), f"{where}.function", "an object with 'name'")
        name = self.text(function, "name", f"{where}.function")
        if not name.strip():
            raise self.fail("empty function name", f"{where}.function.name")
        out = {"name": name}
        if self.text(function, "description", f"{where}.function", optional=True) is not None:
            out["description"] = function["description"]
        if function.get("parameters") is not None:
            params = self.mapping(function["parameters"], f"{where}.function.parameters", "a JSON schema object")
            props = params.get("properties")
            if props is not None:
                for key, prop in self.mapping(props, f"{where}.function.parameters.properties").items():
                    self.mapping(prop, f"{where}.function.parameters.properties.{key}", "a JSON schema object")
            out["parameters"] = params
        return {"type": "function", "function": out}


def _message(c: _Checker, msg, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise c.fail(f"expected an object with 'role' and 'content', got {_type_name(msg)}", where)
    role = msg.get("role")
    if role not in ROLES:
        raise c.fail(f"expected one of {', '.join(repr(r) for r in ROLES)}, got {role!r}", f"{where}.role")
    out = {"role": role}
    if role == "assistant":
        calls = msg.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise c.fail(f"expected a list of tool calls, got {_type_name(calls)}", f"{where}.tool_calls")
            calls = [c.tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
        content = c.text(msg, "content", where, optional=bool(calls))
        out["content"] = content or ""
        if calls:
            out["tool_calls"] = calls
        for key in ("reasoning_content", "reasoning"):
            if c.text(msg, key, where, optional=True):
                out["reasoning_content"] = msg[key]
                break
        return out
    out["content"] = c.text(msg, "content", where)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if c.text(msg, key, where, optional=True) is not None:
                out[key] = msg[key]
    return out


def validate_row(obj: Any, file=None, line=None) -> dict:
    """Validate one decoded row; return it normalised or raise DataError naming file/line/field."""
    c = _Checker(file, line)
    if not isinstance(obj, dict):
        raise c.fail(f"expected a JSON object with a 'messages' list, got {_type_name(obj)}", None)
    if "messages" not in obj:
        raise c.fail("missing; expected a list of {role, content} objects", "messages")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise c.fail(f"expected a list of {{role, content}} objects, got {_type_name(messages)}", "messages")
    if not messages:
        raise c.fail("empty list; expected at least a user and an assistant turn", "messages")
    out = [_message(c, m, i) for i, m in enumerate(messages)]
    _check_order(c, out)
    row = {"messages": out}
    if obj.get("tools") is not None:
        if not isinstance(obj["tools"], list):
            raise c.fail(f"expected a list of tool declarations, got {_type_name(obj['tools'])}", "tools")
        row["tools"] = [c.tool(t, f"tools[{j}]") for j, t in enumerate(obj["tools"])]
    return row


def _check_order(c: _Checker, out: list[dict]) -> None:
    """[system | developer] user assistant (tool+ assistant)* user assistant ..., ending with the assistant."""
    start = 1 if out[0]["role"] in ("system", "developer") else 0
    expected, calls = "user", []
    for i in range(start, len(out)):
        role, field = out[i]["role"], f"messages[{i}].role"
        if role in ("system", "developer"):
            raise c.fail(f"{role!r} is only allowed as the first message; expected {expected!r}", field)
        if role == "tool":
            if not calls:
                raise c.fail("a 'tool' turn must answer the tool_calls of the assistant turn before it", field)
            ids = [call["id"] for call in calls if "id" in call]
            if "tool_call_id" in out[i] and out[i]["tool_call_id"] not in ids:
                raise c.fail(f"{out[i]['tool_call_id']!r} matches no tool_calls[].id of the assistant turn before "
                             f"it (ids: {ids})", f"messages[{i}].tool_call_id")
            if "tool_call_id" not in out[i] and "name" not in out[i]:
                raise c.fail("missing; a 'tool' turn names the call it answers (tool_call_id or name)",
                             f"messages[{i}].tool_call_id")
            expected = "tool or assistant"
            continue
        if expected == "tool":
            raise c.fail(f"expected a 'tool' turn answering the tool_calls of messages[{i - 1}], got {role!r}", field)
        if expected == "tool or assistant" and role != "assistant":
            raise c.fail(f"expected another 'tool' turn or the assistant's reply to the tool results, got {role!r}",
                         field)
        if expected == "user" and role != "user" or expected == "assistant" and role != "assistant":
            raise c.fail(f"wrong turn order: expected {expected!r} (user and assistant alternate, starting with user), "
                         f"got {role!r}", field)
        calls = out[i].get("tool_calls", []) if role == "assistant" else []
        expected = "tool" if calls else "assistant" if role == "user" else "user"
    last = len(out) - 1
    if not any(m["role"] == "assistant" for m in out):
        raise c.fail("no assistant turn; expected the conversation to end with an assistant reply", "messages")
    if out[last]["role"] != "assistant":
        raise c.fail(f"last turn must be 'assistant' (the supervised reply), got {out[last]['role']!r}",
                     f"messages[{last}].role")
    if not out[last]["content"].strip() and not out[last].get("tool_calls"):
        raise c.fail("empty assistant reply; expected non-empty text or tool calls", f"messages[{last}].content")
