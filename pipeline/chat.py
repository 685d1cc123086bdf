"""Conversations: checked, rendered with the model's chat template, and summarised for the predictor.

render_chat(tokenizer, messages)  == tokenizer.apply_chat_template(
                                         [{"role": r, "content": c}, ...], add_generation_prompt=True,
                                         tokenize=False)
predictor_text(messages)           the last user message: what the length predictor sees
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def check_messages(messages: Sequence[ChatMessage], max_messages: int) -> None:
    """``ValueError`` naming the first bad message and the limit it breaks."""
    if not 1 <= len(messages) <= max_messages:
        raise ValueError(f"messages: must hold 1 to {max_messages} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {message.role!r}")
        if not message.content:
            raise ValueError(f"messages[{i}].content: must be a non-empty string")


def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> str:  # a transformers tokenizer
    """The prompt text transformers renders for the conversation, ending with the assistant's turn."""
    if tokenizer.chat_template is None:
        raise ValueError("messages: the served model has no chat template; send prompt instead")
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )


def predictor_text(messages: Sequence[ChatMessage]) -> str:
    """What the length predictor sees for a conversation: the last user message's content.

    The answer being predicted is the reply to that message, and the predictor was trained on ShareGPT
    user turns as plain text (head and tail word pieces of the prompt, no markup). The rendered template
    would spend its head window on the system prompt and ChatML tags it never saw in training, and earlier
    turns are context, not the question. A conversation with no user message falls back to its last one.
    """
    users = [m for m in messages if m.role == "user"]
    return (users or list(messages))[-1].content
