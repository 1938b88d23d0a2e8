"""Chat templates: how a run turns a conversation into prompt token ids.

A run carries its template in `<run>/tokenizer/chat.json` (and so in every checkpoint, with the
tokenizer's files). Training on SFT pairs writes the template of that format: each message's
content as it is, an assistant turn ended by the EOS token, so that one user message renders
exactly like an SFT prompt and earlier turns like the packed examples before it:

    {"format": "prompt_response", "roles": {"system": "{content}\\n", "user": "{content}",
     "assistant": "{content}"}, "eos_after": ["assistant"]}

A run without the file has no chat template (`load_template` returns None): the server then
answers chat requests with a 400 naming the missing file, and never guesses one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from gpt_jax.data.files import atomic_write, read_json
from gpt_jax.data.tokenizer_base import TOKENIZER_DIR
from gpt_jax.errors import SamplingError

CHAT_FILE = "chat.json"
ROLES = ("system", "user", "assistant")
PROMPT_RESPONSE = {"format": "prompt_response",
                   "roles": {"system": "{content}\n", "user": "{content}",
                             "assistant": "{content}"},
                   "eos_after": ["assistant"]}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    roles: dict[str, str]  # role -> a format string with {content}
    eos_after: tuple[str, ...] = ()  # roles whose turn ends with the EOS token

    @classmethod
    def from_dict(cls, raw: dict) -> "ChatTemplate":
        return cls(dict(raw["roles"]), tuple(raw.get("eos_after", ())))

    def render(self, messages: Sequence[dict], tokenizer) -> list[int]:
        """The prompt ids of `messages` (dicts of role and content), ready for the assistant's
        turn; SamplingError naming the first message that cannot be rendered."""
        if not messages:
            raise SamplingError("messages is empty; give at least one user message")
        ids: list[int] = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self.roles:
                raise SamplingError(f"messages[{i}].role={role!r} is not one of "
                                    f"{', '.join(self.roles)}")
            if not isinstance(content, str):
                raise SamplingError(f"messages[{i}].content must be a string")
            ids += tokenizer.encode(self.roles[role].format(content=content))
            if role in self.eos_after:
                ids.append(tokenizer.eos_id)
        if messages[-1].get("role") == "assistant":
            raise SamplingError("the last message is the assistant's; end with a user message")
        return ids


def write_template(home: str, template: dict = PROMPT_RESPONSE) -> None:
    """Put `template` into `<home>/tokenizer/chat.json` unless one is there."""
    path = os.path.join(home, TOKENIZER_DIR, CHAT_FILE)
    if read_json(path) is None:
        atomic_write(path, json.dumps(template, indent=1) + "\n")


def load_template(home: str) -> ChatTemplate | None:
    """The chat template in `<home>/tokenizer/` (see `run.tokenizer_home`), None if none."""
    raw = read_json(os.path.join(home, TOKENIZER_DIR, CHAT_FILE))
    return None if raw is None else ChatTemplate.from_dict(raw)
