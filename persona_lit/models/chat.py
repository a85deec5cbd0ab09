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

    def persona_ids(self, system: str | None) -> list[int]:
        """The persona segment that opens every conversation: BOS and the system prompt (or the model's
        default one). Gemma has no system role: its persona opens the first user turn, which stays open."""
        system = system if system is not None else self.default_system_prompt
        ids = list(self.bos_ids)
        if system and self.fmt.system_in_first_user:
            ids += self._ids(self.fmt.header.format(role=self.fmt.role_name("user"))) + self._ids(f"{system}\n\n")
        elif system:
            ids += self.message_ids("system", system)[0]
        return ids

    def reopen_ids(self) -> list[int]:
        """The user-turn header a later turn opens with where the persona leaves the first user turn open
        (Gemma); [] for formats with a system role."""
        return self._ids(self.fmt.header.format(role=self.fmt.role_name("user"))) if self.fmt.system_in_first_user else []

    def opens_user_turn(self, system: str | None) -> bool:
        """Whether persona_ids(system) leaves the first user turn open (Gemma with a persona)."""
        return self.fmt.system_in_first_user and bool(system if system is not None else self.default_system_prompt)

    def user_turn_ids(self, text: str, open_turn: bool = False) -> list[int]:
        """One user turn ending in the assistant header; `open_turn`: the header was already written."""
        ids = self._ids(text) + self.close_assistant() if open_turn else self.message_ids("user", text)[0]
        return ids + self.generation_prompt()

    def encode_segments(self, messages: list[Message], add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[bool], list[int]]:
        """(ids, assistant mask, segment per token): 0 for the persona, k for user turn k and its answer."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        rest = messages[1:] if system is not None else list(messages)
        ids = self.persona_ids(system)
        mask, segments = [False] * len(ids), [0] * len(ids)
        open_turn, turn = self.opens_user_turn(system), 0
        for m in rest:
            if m["role"] == "user":
                turn += 1
            if open_turn and m["role"] == "user":
                piece, piece_mask = self._ids(m["content"]) + self.close_assistant(), None
                open_turn = False
            else:
                piece, piece_mask = self.message_ids(m["role"], m["content"])
                if not m.get("train", True):  # e.g. filler turns: history to read, not answers to learn
                    piece_mask = None
            ids += piece
            mask += piece_mask or [False] * len(piece)
            segments += [turn] * len(piece)
        if open_turn:  # a persona with no user turn after it: close the open turn
            ids += self.close_assistant()
        if add_generation_prompt:
            ids += self.generation_prompt()
        mask += [False] * (len(ids) - len(mask))
        segments += [turn] * (len(ids) - len(segments))
        return ids, mask, segments

    def encode(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        ids, mask, _ = self.encode_segments(messages, add_generation_prompt)
        return ids, mask

    def generation_prompt(self) -> list[int]:
        return self._ids(self.fmt.header.format(role=self.fmt.role_name("assistant")))

    def turn_ids(self, user_text: str, first: bool = False, system: str | None = None) -> list[int]:
        """Ids appended to a running history for one new user turn, ending in the assistant header."""
        if first:
            return self.persona_ids(system) + self.user_turn_ids(user_text, self.opens_user_turn(system))
        return self.user_turn_ids(user_text)

    def close_assistant(self) -> list[int]:
        """Ids that close a generated assistant answer (the end token, then the trailer)."""
        return [self.end_id] + self._ids(self.fmt.trailer)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
