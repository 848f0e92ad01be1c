"""Reading preference data and normalising each row to one (prompt, chosen, rejected) pair.

Accepted row formats (the ones a TRL ``DPOTrainer`` user already has):

* conversational, implicit prompt: ``chosen`` and ``rejected`` are message lists that share their leading
  messages; the shared prefix is the prompt (the DPO tutorial's system/user/assistant format);
* conversational, explicit prompt: ``prompt`` is a message list, ``chosen``/``rejected`` are message lists
  (or plain strings, taken as one assistant message);
* standard: ``prompt``, ``chosen`` and ``rejected`` are strings; without ``prompt`` the longest common
  character prefix of ``chosen`` and ``rejected`` is the prompt (Anthropic HH style), as TRL does.

Any of them may say ``"chosen_unfinished": true`` or ``"rejected_unfinished": true``: that response was cut off
by a length budget (``build-pairs --mark_unfinished true`` writes it for answers that did not end), so it is
trained without the end of turn (``eos_token``, or what the chat template adds after the text), which it never had.

Every error names the file, the row (line number for JSON Lines) and the field. Reading files is ``reading.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

Messages = list[dict[str, str]]
Text = Union[str, Messages]


class PreferenceDataError(ValueError):
    """Bad preference data; the message names the file, row and field.

    ``kind`` names the kind of bad row (e.g. ``malformed JSON``) when the problem is confined to one row, so that
    ``on_bad_row="skip"`` can count and skip it; it is ``None`` for problems no row can escape (an empty file, a
    tokenizer without a chat template), which always stop the run.
    """

    def __init__(self, message: str, kind: Optional[str] = None) -> None:
        super().__init__(message)
        self.kind = kind


BadRowPolicy = Literal["error", "skip"]


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference pair. ``where`` locates the source row, e.g. ``data.jsonl line 7``."""

    prompt: Text
    chosen: Text
    rejected: Text
    where: str
    chosen_unfinished: bool = False  # cut off by a length budget: no end-of-turn tokens after the text
    rejected_unfinished: bool = False
    tools: Optional[list] = None  # the row's tool definitions (JSON schemas), handed to the chat template

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected


def is_null(value: Any) -> bool:
    """None, or a float NaN (how Parquet and CSV readers fill an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _bad(where: str, field: str, problem: str, kind: str) -> PreferenceDataError:
    return PreferenceDataError(f"{where}: field '{field}': {problem}", kind)


def _check_messages(value: Any, where: str, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise _bad(where, field, f"expected a non-empty list of messages, got {type(value).__name__}", "wrong type")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _bad(where, f"{field}[{i}]", f"expected a message dict, got {type(message).__name__}", "wrong type")
        calls = bool(message.get("tool_calls"))  # an assistant turn that only calls tools may have no content
        for key in ("role", "content"):
            if key not in message and not (key == "content" and calls):
                raise _bad(where, f"{field}[{i}].{key}", "missing", "missing field")
        if not isinstance(message["role"], str) or not (isinstance(message.get("content"), str)
                                                        or calls and message.get("content") is None):
            raise _bad(where, f"{field}[{i}]", "'role' and 'content' must be strings", "wrong type")
    # every key goes to the chat template as written (tool_calls, reasoning_content, name, tool_call_id, ...), as TRL
    # passes them; a tool call's missing content is an empty one
    return [{**m, "content": m.get("content") or ""} for m in value]


def _says_something(message: dict[str, Any]) -> bool:
    """Whether a message has text, or anything besides its role and content (a tool call, reasoning)."""
    return bool(message["content"].strip()) or any(v for k, v in message.items() if k not in ("role", "content"))


def common_prefix_length(a: list, b: list) -> int:
    """Number of leading items ``a`` and ``b`` share (messages, characters or token ids)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_conversation(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, Messages, Messages]:
    n = common_prefix_length(chosen, rejected)
    if n == len(chosen) and n == len(rejected):
        return chosen[:-1], chosen[-1:], rejected[-1:]  # identical pair: caller decides what to do
    if n == 0:
        raise _bad(where, "chosen", "chosen and rejected share no leading message, so there is no prompt; "
                   "add a 'prompt' field or start both with the same messages", "no shared prompt")
    if n == len(chosen) or n == len(rejected):
        field = "chosen" if n == len(chosen) else "rejected"
        raise _bad(where, field, "empty completion: every message is part of the shared prompt", "empty completion")
    return chosen[:n], chosen[n:], rejected[n:]


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit-prompt rule for strings: common character prefix, not ending inside a trailing space."""
    if chosen == rejected:
        return "", chosen, rejected  # identical pair: caller decides what to do
    n = common_prefix_length(list(chosen), list(rejected))
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(row: dict[str, Any], where: str) -> PreferencePair:
    """Turn one raw row into a :class:`PreferencePair`, or raise :class:`PreferenceDataError`."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected an object with 'chosen' and 'rejected', got "
                                  f"{type(row).__name__}", "not an object")
    for field in ("chosen", "rejected"):
        if field not in row:
            raise _bad(where, field, f"missing (fields present: {sorted(row)})", "missing field")
        if is_null(row[field]):
            raise _bad(where, field, "no value (null, or an empty cell of a Parquet or CSV file)", "missing field")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    prompt = None if is_null(prompt) else prompt  # no prompt in this row: the shared prefix is the prompt
    if isinstance(prompt, list):  # explicit conversational prompt
        prompt = _check_messages(prompt, where, "prompt")
        chosen, rejected = (
            [{"role": "assistant", "content": v}] if isinstance(v, str) else _check_messages(v, where, f)
            for f, v in (("chosen", chosen), ("rejected", rejected))
        )
    elif isinstance(chosen, list) or isinstance(rejected, list):
        chosen = _check_messages(chosen, where, "chosen")
        rejected = _check_messages(rejected, where, "rejected")
        if prompt is not None:
            raise _bad(where, "prompt", "a string prompt cannot be combined with message-list completions",
                       "wrong type")
        prompt, chosen, rejected = _split_conversation(chosen, rejected, where)
    else:
        for field, value in (("chosen", chosen), ("rejected", rejected), ("prompt", prompt)):
            if value is not None and not isinstance(value, str):
                raise _bad(where, field, f"expected a string or a list of messages, got {type(value).__name__}",
                           "wrong type")
        if prompt is None:
            prompt, chosen, rejected = _split_text(chosen, rejected)
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list) and value[0]["role"] != "assistant":  # the generation prompt opens that turn
            raise _bad(where, field, f"the completion starts with a {value[0]['role']!r} message; it must start "
                       "with an 'assistant' one", "wrong role")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if chosen == rejected:
            break  # reported as an identical pair, not as an empty completion
        if not (value.strip() if isinstance(value, str) else any(_says_something(m) for m in value)):
            raise _bad(where, field, "empty completion", "empty completion")
    unfinished = {}
    for field in ("chosen_unfinished", "rejected_unfinished"):
        value = row.get(field)  # null: a data set column that other rows fill
        value = None if is_null(value) else value
        if value is not None and not isinstance(value, bool):
            raise _bad(where, field, f"expected true or false, got {json.dumps(value, default=repr)}", "wrong type")
        unfinished[field] = bool(value)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, where=where, **unfinished,
                          tools=_tools(row, where, isinstance(chosen, list)))


def _tools(row: dict[str, Any], where: str, conversational: bool) -> Optional[list]:
    """The row's ``tools`` (TRL's column: a list of tool schemas for the chat template), or None."""
    tools = row.get("tools")
    if is_null(tools) or tools == []:
        return None
    if isinstance(tools, str):  # a column of JSON text, as some data sets store it
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise _bad(where, "tools", f"not valid JSON ({e.msg})", "wrong type") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _bad(where, "tools", f"expected a list of tool schemas (objects), got {type(tools).__name__}",
                   "wrong type")
    if not conversational:
        raise _bad(where, "tools", "tools need conversational rows (lists of messages) for the chat template",
                   "wrong type")
    return tools
