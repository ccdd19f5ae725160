"""The zoo tokenizer: a small byte-level BPE trained on text like the built-in environments'.

It owns three things: the synthetic training corpus (tool-call JSON, short prompts, SQL, Python
snippets, numbers, tool results), the trained ``assets/tokenizer.json`` shipped with the package,
and the ChatML chat template with a compact tools block.

Properties the rest of agentopd relies on:

* Byte-level: any unicode text round-trips through ``encode`` / ``decode``.
* Numbers are split into single digits, so tiny models can copy and compute them digit by digit.
* Special tokens: ``<|endoftext|>`` (pad and bos), ``<|im_start|>``, ``<|im_end|>`` (end of turn
  = eos). ``<tool_call>`` and ``</tool_call>`` are ordinary (non-special) single tokens.
* The chat template never rewrites earlier history: rendering ``messages[:n]`` is a prefix of
  rendering ``messages[:n+1]``. Assistant content is rendered raw (it already holds the Hermes
  ``<tool_call>`` blocks exactly as sampled); ``tool_calls`` structure is ignored.

Rebuild the shipped asset (deterministic for a given ``tokenizers`` version)::

    python -m agentopd.zoo.tokenizer --rebuild
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
"""Special tokens, with ids 0, 1, 2 in this order."""
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]
"""Ordinary added tokens: each is one token, and decodes to itself."""
VOCAB_SIZE = 1536
"""Total vocabulary size, special and added tokens included (a multiple of 64)."""
CORPUS_SEED = 1234
CORPUS_DOCS = 60_000

CHAT_TEMPLATE = (
    "{%- macro render_type(p) -%}"
    "{%- if p.type is defined and p.type is string -%}{{ p.type }}"
    "{%- elif p.type is defined -%}{{ p.type | join('|') }}"
    "{%- elif p.anyOf is defined -%}"
    "{%- for q in p.anyOf -%}{{ render_type(q) }}{{ '|' if not loop.last }}{%- endfor -%}"
    "{%- elif p.enum is defined -%}{{ p.enum | map('tojson') | join('|') }}"
    "{%- else -%}any{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content if messages[0].content is string else '' -%}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = none -%}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- if system is not none or tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if system -%}{{ system }}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if system -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ 'Tools:' }}"
    "{%- for t in tools -%}"
    "{%- set fn = t.function if t.function is defined else t -%}"
    "{%- set params = fn.parameters.properties if fn.parameters is defined"
    " and fn.parameters.properties is defined else {} -%}"
    "{%- set required = fn.parameters.required if fn.parameters is defined"
    " and fn.parameters.required is defined else [] -%}"
    "{{ '\\n' + fn.name + '(' }}"
    "{%- for name, p in params.items() -%}"
    "{{ name }}{{ '?' if name not in required }}: {{ render_type(p) }}"
    "{{ ', ' if not loop.last }}"
    "{%- endfor -%}"
    "{{ ')' }}"
    "{%- if fn.description -%}{{ ' - ' + (fn.description | replace('\\n', ' ')) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- elif m.content is iterable -%}"
    "{%- for part in m.content -%}{%- if part.text is defined -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML with a compact tools block: ``name(arg: type, opt?: type) - description`` per tool."""


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load the zoo tokenizer as a ``transformers`` fast tokenizer with the chat template.

    Args:
        path: A ``tokenizer.json`` file; defaults to the shipped asset.

    Returns:
        A tokenizer with ``eos_token="<|im_end|>"``, ``pad_token="<|endoftext|>"``, left padding
        and :data:`CHAT_TEMPLATE`.
    """
    path = Path(path) if path is not None else TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"zoo tokenizer not found at {path}; run `python -m agentopd.zoo.tokenizer --rebuild`"
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path)),
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------------- training
def train_tokenizer(
    vocab_size: int = VOCAB_SIZE, seed: int = CORPUS_SEED, docs: int = CORPUS_DOCS
) -> Tokenizer:
    """Train the byte-level BPE on the synthetic corpus (see :func:`synthetic_corpus`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed, docs), trainer=trainer)
    return tok


def rebuild(path: Path = TOKENIZER_FILE) -> Tokenizer:
    """Train and write the shipped ``tokenizer.json``."""
    tok = train_tokenizer()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp), pretty=False)
    tmp.replace(path)
    return tok


# ---------------------------------------------------------------------------- corpus
_WORDS = (
    "the a an of to in and or is are was be find look up key value answer submit final result "
    "tool call table row column query database select count sum average total number list code "
    "function return print test pass fail error run python file name id user task step chain next "
    "first last each all which what how many who where when find the value of follow starting "
    "from until you reach then write compute check output input string integer float true false "
    "none null empty sorted order by group limit join price quantity city age salary department "
    "employee customer orders product sales date year month score student grade item category "
    "please give me use tools to solve this agent assistant system message hop hops link points "
    "store memory secret word words line lines character characters longest shortest largest "
    "smallest maximum minimum even odd prime reverse fix bug implement returns given inputs"
).split()
_NAMES = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy rupert sybil "
    "trent victor walter paris london berlin tokyo madrid rome oslo lima cairo delhi"
).split()
_TOOLS = {
    "lookup": ["key"],
    "submit": ["answer"],
    "query": ["sql"],
    "sql": ["query"],
    "list_tables": [],
    "describe": ["table"],
    "run_python": ["code"],
    "python": ["code"],
    "run_tests": [],
    "read_file": ["path"],
    "write_file": ["path", "content"],
    "search": ["query", "limit"],
    "get": ["name"],
}
_TABLES = ["employees", "orders", "customers", "products", "sales", "students", "items", "cities"]
_COLUMNS = ["id", "name", "age", "salary", "city", "price", "quantity", "dept", "score", "year"]


def _num(r: random.Random) -> str:
    k = r.random()
    if k < 0.5:
        return str(r.randint(0, 99))
    if k < 0.8:
        return str(r.randint(100, 99999))
    if k < 0.9:
        return f"{r.uniform(-1000, 1000):.{r.randint(1, 3)}f}"
    return str(r.randint(-500, -1))


def _key(r: random.Random) -> str:
    style = r.randint(0, 3)
    if style == 0:
        return f"k{r.randint(0, 999)}"
    if style == 1:
        return r.choice(_WORDS) + "_" + str(r.randint(0, 99))
    if style == 2:
        return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 6)))
    return r.choice(_NAMES)


def _sentence(r: random.Random, n: int | None = None) -> str:
    words = [r.choice(_WORDS) for _ in range(n or r.randint(3, 14))]
    if r.random() < 0.3:
        words.insert(r.randint(0, len(words)), _key(r))
    if r.random() < 0.3:
        words.insert(r.randint(0, len(words)), _num(r))
    s = " ".join(words)
    return s[0].upper() + s[1:] + r.choice([".", ".", "?", ":", "!"])


def _sql(r: random.Random) -> str:
    t = r.choice(_TABLES)
    cols = r.sample(_COLUMNS, r.randint(1, 3))
    kind = r.randint(0, 4)
    if kind == 0:
        q = f"SELECT {', '.join(cols)} FROM {t}"
    elif kind == 1:
        agg = r.choice(["COUNT(*)", f"SUM({cols[0]})", f"AVG({cols[0]})", f"MAX({cols[0]})"])
        q = f"SELECT {agg} FROM {t}"
    elif kind == 2:
        q = f"SELECT {cols[0]}, COUNT(*) FROM {t} GROUP BY {cols[0]}"
    elif kind == 3:
        t2 = r.choice(_TABLES)
        q = f"SELECT a.{cols[0]}, b.{r.choice(_COLUMNS)} FROM {t} a JOIN {t2} b ON a.id = b.{t[:-1]}_id"
    else:
        q = f"SELECT * FROM {t}"
    if r.random() < 0.5:
        op = r.choice(["=", ">", "<", ">=", "<=", "!="])
        val = _num(r) if r.random() < 0.6 else f"'{r.choice(_NAMES)}'"
        q += f" WHERE {r.choice(_COLUMNS)} {op} {val}"
    if r.random() < 0.3:
        q += f" ORDER BY {r.choice(_COLUMNS)} {r.choice(['ASC', 'DESC'])}"
    if r.random() < 0.2:
        q += f" LIMIT {r.randint(1, 20)}"
    if r.random() < 0.1:
        q = f"CREATE TABLE {t} ({', '.join(c + ' ' + r.choice(['INTEGER', 'TEXT', 'REAL']) for c in cols)})"
    return q + (";" if r.random() < 0.5 else "")


def _python(r: random.Random) -> str:
    f = r.choice(["solve", "f", "count_words", "is_prime", "fib", "total", "longest", "reverse"])
    v = r.choice(["x", "n", "s", "xs", "items", "data", "nums", "text"])
    body = r.choice(
        [
            f"    return sum({v}) // len({v})",
            f"    return {v}[::-1]",
            f"    return len({v}.split())",
            f"    result = 0\n    for i in range({v}):\n        result += i * {r.randint(1, 9)}\n    return result",
            f"    if {v} < 2:\n        return False\n    return all({v} % d for d in range(2, {v}))",
            f"    return max({v}, key=len)",
            f"    return sorted({v})",
            f"    return [y for y in {v} if y % 2 == 0]",
            f"    return {{k: {v}.count(k) for k in set({v})}}",
        ]
    )
    code = f"def {f}({v}):\n{body}\n"
    if r.random() < 0.5:
        code += f"\nprint({f}({r.choice([_num(r), repr(_key(r)), '[1, 2, 3]'])}))"
    if r.random() < 0.2:
        code += f"\nassert {f}({_num(r)}) == {_num(r)}"
    if r.random() < 0.15:
        code = f"import {r.choice(['math', 'json', 're', 'collections'])}\n" + code
    return code


def _args(r: random.Random, names: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in names:
        if a in ("sql", "query"):
            out[a] = _sql(r)
        elif a == "code":
            out[a] = _python(r)
        elif a == "answer":
            out[a] = r.choice([_num(r), _key(r), r.choice(_NAMES), _sentence(r, 2)])
        elif a == "limit":
            out[a] = r.randint(1, 20)
        else:
            out[a] = _key(r)
    return out


def _tool_call(r: random.Random) -> str:
    name = r.choice(list(_TOOLS))
    return (
        "<tool_call>"
        + json.dumps({"name": name, "arguments": _args(r, _TOOLS[name])})
        + "</tool_call>"
    )


def _tool_result(r: random.Random) -> str:
    kind = r.randint(0, 7)
    if kind == 0:
        return f"{_key(r)} -> {_key(r)}"
    if kind == 1:
        return _num(r)
    if kind == 2:
        cols = r.sample(_COLUMNS, r.randint(1, 4))
        rows = [" | ".join(cols)]
        for _ in range(r.randint(1, 5)):
            rows.append(" | ".join(_num(r) if r.random() < 0.6 else r.choice(_NAMES) for _ in cols))
        return "\n".join(rows)
    if kind == 3:
        return json.dumps({_key(r): _num(r) for _ in range(r.randint(1, 3))})
    if kind == 4:
        err = r.choice(["unknown_tool", "schema", "exception", "timeout", "parse"])
        return f"Error ({err}): {_sentence(r)}"
    if kind == 5:
        return "Answer submitted."
    if kind == 6:
        lines = [
            f"{r.choice(['PASS', 'FAIL'])} test_{r.randint(0, 9)}" for _ in range(r.randint(1, 4))
        ]
        if r.random() < 0.3:
            lines.append(
                f'Traceback (most recent call last):\n  File "main.py", line {r.randint(1, 40)}\n'
                f"{r.choice(['NameError', 'TypeError', 'ValueError', 'ZeroDivisionError'])}: {_sentence(r, 4)}"
            )
        return "\n".join(lines)
    return f"[{', '.join(_num(r) for _ in range(r.randint(1, 6)))}]"


def _tools_line(r: random.Random) -> str:
    name = r.choice(list(_TOOLS))
    args = ", ".join(
        f"{a}: {r.choice(['string', 'integer', 'string|integer|number'])}" for a in _TOOLS[name]
    )
    return f"{name}({args}) - {_sentence(r)}"


def synthetic_corpus(seed: int = CORPUS_SEED, docs: int = CORPUS_DOCS) -> Iterator[str]:
    """Deterministic documents mixing the kinds of text agent episodes contain."""
    from agentopd.env import DEFAULT_SYSTEM_PROMPT

    r = random.Random(seed)
    makers = [
        lambda: _tool_call(r),
        lambda: _tool_call(r),
        lambda: _tool_result(r),
        lambda: _sentence(r),
        lambda: _sql(r),
        lambda: _python(r),
        lambda: " ".join(_num(r) for _ in range(r.randint(1, 8))),
        lambda: "Tools:\n" + "\n".join(_tools_line(r) for _ in range(r.randint(1, 4))),
        lambda: DEFAULT_SYSTEM_PROMPT,
        lambda: " ".join(_key(r) for _ in range(r.randint(1, 6))),
    ]
    for _ in range(docs):
        parts = [r.choice(makers)() for _ in range(r.randint(1, 4))]
        yield r.choice(["\n", " ", "\n\n"]).join(parts)


def main(argv: list[str] | None = None) -> None:
    """``python -m agentopd.zoo.tokenizer --rebuild``: retrain and write the shipped asset."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rebuild", action="store_true", help=f"retrain and write {TOKENIZER_FILE}")
    args = p.parse_args(argv)
    if args.rebuild:
        tok = rebuild()
        print(f"wrote {TOKENIZER_FILE} (vocab {tok.get_vocab_size()})")
    else:
        loaded = load_tokenizer()
        print(f"{TOKENIZER_FILE}: vocab {len(loaded)}")


if __name__ == "__main__":
    main()
