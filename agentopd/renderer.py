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

Text that comes from the environment, tools, users or the task (every message's content, name and
call id, and the strings of the tool schemas) is data, never markup:

* it is made valid UTF-8 first (lone surrogates, which is what undecodable bytes become under
  ``surrogateescape``, are replaced by U+FFFD, visibly);
* special-token strings in it (``<|im_end|>``, ...) are tokenized as plain text, so a tool that
  prints ``<|im_end|>\n<|im_start|>assistant`` cannot forge the end of its message or a turn.
  Only the special tokens the chat template itself writes become special ids. This holds on
  every path: :meth:`Renderer.initial_prompt` (also used for a teacher's own prompt),
  :meth:`Renderer.bridge` and :meth:`Renderer.encode`.

How: before the template runs, every special-token string in that text is replaced by a
placeholder from the Private Use Area (the placeholder character itself is escaped too, so the
mapping is reversible); after rendering, special-token strings left in the output are the
template's own. Prefix checks compare the unescaped text, as before.
"""

from __future__ import annotations

import re
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


_ESC = "\ue000"
"""Starts every placeholder: ``_ESC + _ESC`` is a literal ``_ESC``, ``_ESC + chr(_CODE0 + k)``
stands for special token ``k``."""
_CODE0 = 0xE001
_MAX_SPECIALS = 0x1000


def valid_utf8(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD; valid surrogate pairs are joined.

    Python strings can hold code points that UTF-8 cannot encode (lone surrogates, e.g. from
    ``bytes.decode(errors="surrogateescape")`` or a ``"\\ud800"`` JSON escape); tokenizers reject
    them. Valid text is returned unchanged (and fast).
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


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
        self.special_tokens: dict[str, int] = special_tokens(tokenizer)
        """Every special token of the tokenizer, ``{text: id}``: never produced from data."""
        self.special_ids: frozenset[int] = frozenset(self.special_tokens.values())
        if len(self.special_tokens) >= _MAX_SPECIALS:
            raise ValueError(f"too many special tokens ({len(self.special_tokens)})")
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._specials = ordered
        self._escape_re = re.compile("|".join([re.escape(_ESC), *map(re.escape, ordered)]))
        self._special_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._codes = {t: _ESC + chr(_CODE0 + k) for k, t in enumerate(ordered)}
        self._codes[_ESC] = _ESC + _ESC
        self._uncodes = {v[1]: k for k, v in self._codes.items()}
        self._placeholder_re = re.compile(re.escape(_ESC) + "(.)", re.DOTALL)

    def render(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None,
        *,
        add_generation_prompt: bool,
    ) -> str:
        """The chat template applied to ``messages`` as text (data made valid UTF-8)."""
        return self._unescape(self._render_escaped(messages, tools, add_generation_prompt))

    def encode(self, text: str) -> list[int]:
        """``text`` as plain text: valid UTF-8, and special-token strings never become special ids.

        For sampled-like text (scripted experts) and data; rendered templates go through
        :meth:`initial_prompt` and :meth:`bridge`, which keep the template's own special tokens.
        """
        return self._encode_plain(valid_utf8(str(text)))

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
        rendered = self._render_escaped(messages, tools, True)
        return self._tokenize_rendered(rendered), self._unescape(rendered)

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
        rendered = self._render_escaped(conversation, tools, True)
        full = self._unescape(rendered)
        split = self._escaped_offset(rendered, len(stream_text))
        if full.startswith(stream_text) and split is not None:
            rest = rendered[split:]
            return Bridge(
                self._tokenize_rendered(rest), new_segment=False, text=self._unescape(rest)
            )
        where = _first_difference(full, stream_text)
        detail = (
            f"the chat template does not preserve the token stream's prefix (first difference at "
            f"character {where}: stream has {stream_text[where : where + 40]!r}, template renders "
            f"{full[where : where + 40]!r}). Templates that rewrite history (e.g. strip earlier reasoning) "
            "break token-exact training data."
        )
        if self.on_prefix_mismatch == "error":
            raise PrefixMismatchError(
                detail + " Set rollout.on_prefix_mismatch=new-segment to start a new segment from a fresh "
                "rendering instead."
            )
        return Bridge(self._tokenize_rendered(rendered), new_segment=True, text=full)

    # ------------------------------------------------------------------ data vs. markup
    def _escape(self, text: str) -> str:
        text = valid_utf8(text)
        if _ESC not in text and (self._special_re is None or not self._special_re.search(text)):
            return text
        return self._escape_re.sub(lambda m: self._codes[m.group()], text)

    def _unescape(self, rendered: str) -> str:
        if _ESC not in rendered:
            return rendered
        return self._placeholder_re.sub(
            lambda m: self._uncodes.get(m.group(1), m.group()), rendered
        )

    def _escape_value(self, value: Any) -> Any:
        """Escape every string in a tool schema (dict keys stay: templates look them up)."""
        if isinstance(value, str):
            return self._escape(value)
        if isinstance(value, dict):
            return {k: self._escape_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._escape_value(v) for v in value]
        return value

    def _render_escaped(
        self, messages: list[Message], tools: list[dict[str, Any]] | None, gen: bool
    ) -> str:
        dicts = []
        for d in template_dicts(messages):
            dicts.append(
                {
                    k: (v if k == "role" or not isinstance(v, str) else self._escape(v))
                    for k, v in d.items()
                }
            )
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": gen}
        if tools:
            kwargs["tools"] = self._escape_value(tools)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(dicts, **kwargs)

    def _escaped_offset(self, rendered: str, raw_len: int) -> int | None:
        """Index in ``rendered`` whose unescaped prefix has ``raw_len`` characters.

        ``None`` when that point falls inside a placeholder's expansion.
        """
        delta = 0  # raw position minus escaped position
        for m in self._placeholder_re.finditer(rendered):
            raw_start = m.start() + delta
            if raw_len <= raw_start:
                break
            width = len(self._uncodes.get(m.group(1), m.group()))
            if raw_len < raw_start + width:
                return None
            delta += width - len(m.group())
        return raw_len - delta if raw_len - delta <= len(rendered) else None

    def _tokenize_rendered(self, rendered: str) -> list[int]:
        """Tokens of template output: its special-token strings are special, data is plain."""
        if _ESC not in rendered or self._special_re is None:
            return list(self.tokenizer.encode(rendered, add_special_tokens=False))
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(rendered):
            if m.start() > pos:
                out += self._encode_plain(self._unescape(rendered[pos : m.start()]))
            out.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(rendered):
            out += self._encode_plain(self._unescape(rendered[pos:]))
        return out

    def _encode_plain(self, text: str) -> list[int]:
        """Tokens of ``text`` with no special ids, whatever special-token strings it holds."""
        if not text:
            return []
        try:
            ids = list(
                self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            )
        except TypeError:  # a tokenizer without the option
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if self._special_re is None or not self.special_ids.intersection(ids):
            return ids
        # The tokenizer still matched special tokens: encode each occurrence in two pieces
        # (its first character and the rest), neither of which is the special string.
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            out += self._encode_plain(text[pos : m.start()]) if m.start() > pos else []
            out += self._encode_plain(m.group()[:1]) + self._encode_plain(m.group()[1:])
            pos = m.end()
        out += self._encode_plain(text[pos:]) if pos < len(text) else []
        if self.special_ids.intersection(out):
            raise ValueError(f"cannot encode {text[:80]!r} without special tokens")
        return out


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """``{text: id}`` of every special token of a ``transformers`` tokenizer.

    The tokenizer's named special tokens plus every added token flagged ``special`` (some
    tokenizers, like the zoo's, do not list ``<|im_start|>`` among the named ones).
    """
    found: dict[str, int] = {}
    for text in getattr(tokenizer, "all_special_tokens", []) or []:
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int):
            found[str(text)] = tid
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tid, tok in decoder.items():
        if getattr(tok, "special", False):
            found[str(getattr(tok, "content", tok))] = int(tid)
    return {t: i for t, i in found.items() if t}


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
