"""Messages ↔ tokens through the tokenizer's chat template, token-in-token-out.

The first prompt of an episode is the chat template applied to the opening messages. After that,
each next prompt is the previous token sequence *exactly* (prompt + sampled tokens) plus "bridge"
tokens that render the new messages (tool results) and the next generation prompt. Sampled text
is never re-tokenized for training.

The bridge is found on the text side: the template is applied to the whole conversation, and the
text rendered so far (the decoded token stream) must be a prefix of it. A template that rewrites
history (for example one that drops earlier reasoning) breaks that, and the renderer either raises
:class:`PrefixMismatchError` (``on_prefix_mismatch="error"``, the default) or starts a new segment
from a fresh rendering (``"new-segment"``). It never hands back silently misaligned tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from agentopd.types import Message

MismatchPolicy = Literal["error", "new-segment"]


class PrefixMismatchError(RuntimeError):
    """The chat template did not preserve the token stream's prefix."""


@dataclass
class Bridge:
    """Tokens to append before the next generation."""

    tokens: list[int]
    """Bridge token ids (mask 0)."""
    new_segment: bool = False
    """True when the template rewrote history: ``tokens`` is then a whole fresh prompt."""
    text: str = ""
    """The rendered text of the bridge (for display and checks)."""


def template_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as handed to ``apply_chat_template``.

    Assistant turns carry their raw sampled text as content and no structured ``tool_calls``, so
    that templates which re-render calls from structure cannot drift from what was sampled.
    """
    out = []
    for m in messages:
        d = m.to_dict()
        if m.role == "assistant":
            d.pop("tool_calls", None)
        out.append(d)
    return out


class Renderer:
    """Token-exact rendering of multi-turn conversations.

    Args:
        tokenizer: A ``transformers`` tokenizer with a chat template.
        on_prefix_mismatch: ``"error"`` or ``"new-segment"`` (see the module docstring).
        chat_template: Optional template overriding the tokenizer's.
        end_of_turn: The token that ends an assistant turn (default: the tokenizer's eos token).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        on_prefix_mismatch: MismatchPolicy = "error",
        chat_template: str | None = None,
        end_of_turn: str | None = None,
    ):
        if on_prefix_mismatch not in ("error", "new-segment"):
            raise ValueError(
                f"on_prefix_mismatch must be 'error' or 'new-segment', got {on_prefix_mismatch!r}"
            )
        self.tokenizer = tokenizer
        self.on_prefix_mismatch = on_prefix_mismatch
        self.chat_template = chat_template
        eot = end_of_turn or tokenizer.eos_token
        if eot is None:
            raise ValueError("the tokenizer has no eos token; pass end_of_turn= explicitly")
        self.eot_token = eot
        self.eot_id = tokenizer.convert_tokens_to_ids(eot)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id

    def render(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None,
        *,
        add_generation_prompt: bool,
    ) -> str:
        """The chat template applied to ``messages`` as text."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(template_dicts(messages), **kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: list[int]) -> str:
        """Decode for display and prefix checks (special tokens kept)."""
        return self.tokenizer.decode(
            tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def strip_eot(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Split off a trailing end-of-turn token; returns (content tokens, ended)."""
        if tokens and tokens[-1] == self.eot_id:
            return tokens[:-1], True
        return tokens, False

    def initial_prompt(
        self, messages: list[Message], tools: list[dict[str, Any]] | None
    ) -> tuple[list[int], str]:
        """Tokens (and text) of the first prompt, ending with the generation prompt."""
        text = self.render(messages, tools, add_generation_prompt=True)
        return self.encode(text), text

    def bridge(
        self,
        stream_text: str,
        conversation: list[Message],
        tools: list[dict[str, Any]] | None,
    ) -> Bridge:
        """Bridge tokens from the current stream to the next generation prompt.

        Args:
            stream_text: Text of the segment so far: its initial prompt text plus the decoded
                tokens appended since (sampled turns and earlier bridges).
            conversation: All messages so far, including the assistant turn just sampled and the
                new messages to render.
            tools: Tool schemas passed to the template.
        """
        full = self.render(conversation, tools, add_generation_prompt=True)
        if full.startswith(stream_text):
            rest = full[len(stream_text) :]
            return Bridge(self.encode(rest), new_segment=False, text=rest)
        where = _first_difference(full, stream_text)
        detail = (
            f"the chat template does not preserve the token stream's prefix (first difference at "
            f"character {where}: stream has {stream_text[where : where + 40]!r}, template renders "
            f"{full[where : where + 40]!r}). Templates that rewrite history (e.g. strip earlier reasoning) "
            "break token-exact training data."
        )
        if self.on_prefix_mismatch == "error":
            raise PrefixMismatchError(
                detail + " Set renderer.on_prefix_mismatch=new-segment to re-render instead."
            )
        return Bridge(self.encode(full), new_segment=True, text=full)


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
