"""Chat formatting at the token level, with the assistant-token mask.

Every message is tokenized piece by piece (turn header, content, end-of-turn token, trailer), so
training batches and the conversation runner produce the same ids for the same history, and the
mask marks exactly the assistant's content plus its end-of-turn token (the model must learn to stop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persona_lit.errors import UserError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class ChatFormat:
    name: str
    header: str  # turn header with a {role} slot
    end: str  # end-of-turn token: trained on assistant turns, the stop token for generation
    trailer: str  # text after the end token (a newline), never trained
    roles: tuple[tuple[str, str], ...] = ()  # renames, e.g. Gemma calls the assistant "model"
    system_in_first_user: bool = False  # Gemma has no system role: prepend it to the first user turn
    bos: bool = True  # ChatML's template starts with <|im_start|>, no separate BOS

    def role_name(self, role: str) -> str:
        return dict(self.roles).get(role, role)


FORMATS = {
    "chatml": ChatFormat("chatml", "<|im_start|>{role}\n", "<|im_end|>", "\n", bos=False),
    "gemma": ChatFormat(
        "gemma", "<start_of_turn>{role}\n", "<end_of_turn>", "\n", roles=(("assistant", "model"),),
        system_in_first_user=True,
    ),
    "llama3": ChatFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
}


def chat_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise UserError(f"unknown chat_format {name!r} (model.chat_format); allowed: {', '.join(FORMATS)}")
    return FORMATS[name]


class ChatTokenizer:
    """Turns messages into ids + assistant mask for one tokenizer and one chat format."""

    def __init__(self, tokenizer, fmt: ChatFormat, default_system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.default_system_prompt = default_system_prompt
        end_ids = self._ids(fmt.end)
        if len(end_ids) != 1:
            raise UserError(f"chat format {fmt.name!r}: end token {fmt.end!r} is not one token in this tokenizer")
        self.end_id = end_ids[0]
        self.bos_ids = [tokenizer.bos_token_id] if fmt.bos and tokenizer.bos_token_id is not None else []
        pad = tokenizer.pad_token_id
        # Padding is masked out by attention_mask and labels, so reusing EOS as pad is safe.
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _normalize(self, messages: list[Message]) -> list[Message]:
        msgs = [dict(m) for m in messages]
        if (not msgs or msgs[0]["role"] != "system") and self.default_system_prompt:
            msgs.insert(0, {"role": "system", "content": self.default_system_prompt})
        if self.fmt.system_in_first_user and msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
            if msgs and msgs[0]["role"] == "user":
                msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
            else:
                msgs.insert(0, {"role": "user", "content": system})
        return msgs

    def message_ids(self, role: str, content: str, close: bool = True) -> tuple[list[int], list[bool]]:
        """Ids of one message and its mask (True on assistant content and end token)."""
        head = self._ids(self.fmt.header.format(role=self.fmt.role_name(role)))
        body = self._ids(content)
        train = role == "assistant"
        ids, mask = head + body, [False] * len(head) + [train] * len(body)
        if close:
            tail = self._ids(self.fmt.trailer)
            ids += [self.end_id] + tail
            mask += [train] + [False] * len(tail)
        return ids, mask

    def encode(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        ids, mask = list(self.bos_ids), [False] * len(self.bos_ids)
        for m in self._normalize(messages):
            i, k = self.message_ids(m["role"], m["content"])
            ids += i
            mask += k
        if add_generation_prompt:
            ids += self.generation_prompt()
            mask += [False] * (len(ids) - len(mask))
        return ids, mask

    def generation_prompt(self) -> list[int]:
        return self._ids(self.fmt.header.format(role=self.fmt.role_name("assistant")))

    def turn_ids(self, user_text: str, first: bool = False, system: str | None = None) -> list[int]:
        """Ids appended to a running history for one new user turn, ending in the assistant header."""
        if first:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
            return self.encode(msgs, add_generation_prompt=True)[0]
        return self.message_ids("user", user_text)[0] + self.generation_prompt()

    def close_assistant(self) -> list[int]:
        """Ids that close a generated assistant answer (the end token, then the trailer)."""
        return [self.end_id] + self._ids(self.fmt.trailer)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
