"""``sql``: answer questions about a small SQLite shop database with read-only SQL queries.

Each episode generates a real database from its seed (``customers``, ``products``, ``orders``),
writes it to a temporary file and opens it read-only (``file:...?mode=ro``, ``query_only``, and
an authorizer that allows reading only). Questions come from templates; difficulty 1..5 is the
number of dependent queries the expert needs (e.g. look up a customer id, then count that
customer's orders). Difficulties 4 and 5 are long chains through the orders table, each query
needing the previous one's value (see ``docs/long_horizon.md``); the default draws 1..3. The reference answer is computed in Python when the task is generated, and
the reward depends only on the submitted answer.

Query limits: a wall-clock timeout enforced by SQLite's progress handler, a row limit on
results, and a length limit on strings and blobs. Every SQLite error (syntax, write attempts,
timeouts) comes back to the model as result text. Results are compact: a header line and rows,
``|``-separated. Temporary files are removed in :meth:`SqlEnv.close_episode` (called by ``reset``
and ``close``) and when the env is garbage-collected.

Example::

    env = agentopd.make("sql", min_difficulty=2, max_difficulty=2)
    messages, info = env.reset(seed=0)
    messages, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentopd.env import Env, Task, answered_calls
from agentopd.tooling import Tool, tool
from agentopd.types import Message

SCHEMA = (
    "customers(id, name, city), products(id, name, price), orders(id, customer_id, product_id, qty)"
)
SYSTEM_PROMPT = (
    'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
    f"Tools: sql(query), submit(answer). Tables: {SCHEMA}."
)
NAMES = ["ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou"]
CITIES = ["oslo", "rome", "lima", "kyiv", "bonn"]
PRODUCTS = ["pen", "cup", "hat", "mug", "box", "bag", "map", "fan"]
EVAL_SHARE = 5
"""One task in ``EVAL_SHARE`` belongs to the eval split; the rest to train (disjoint by content)."""
MAX_CELL_CHARS = 40
MAX_DIFFICULTY = 5
MAX_QUERY_CHARS = 2000
_ALLOWED_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "foreign_key_list"}


@dataclass
class Step:
    """One query of the expert's plan: ``query`` is formatted with earlier steps' values."""

    query: str
    out: str


@dataclass
class Shop:
    """The generated data (also the ground truth the reference answer is computed from)."""

    customers: list[tuple[int, str, str]]
    products: list[tuple[int, str, int]]
    orders: list[tuple[int, int, int, int]]


class SqlEnv(Env):
    """Answer a question about a small shop database with ``sql(query)`` calls.

    Args:
        min_difficulty: Smallest difficulty (number of dependent queries) drawn, 1..5.
        max_difficulty: Largest difficulty drawn, 1..5 (default 3; 4 and 5 are the long chains).
        n_customers: Rows in ``customers`` (at most 12).
        n_products: Rows in ``products`` (at most 8).
        n_orders: Rows in ``orders``.
        max_rows: Result rows shown per query; the rest are cut with a note.
        query_timeout_s: Wall-clock limit per query; longer queries are aborted and reported.
        max_turns: Turn limit (the expert needs difficulty + 1 turns; use 8 for difficulty 5).
        **kwargs: Passed to :class:`agentopd.Env` (``tool_timeout_s``, ``max_output_chars``,
            ``render_mode``).

    ``reset`` options: ``difficulty`` (this episode's difficulty), plus the base options
    (``split``, ``task_index``, ``max_turns``, ``replay``).
    """

    description = "Answer a question about a small read-only SQLite shop database with sql(query)."
    system_prompt = SYSTEM_PROMPT

    def __init__(
        self,
        min_difficulty: int = 1,
        max_difficulty: int = 3,
        n_customers: int = 6,
        n_products: int = 5,
        n_orders: int = 12,
        max_rows: int = 20,
        query_timeout_s: float = 0.5,
        max_turns: int = 6,
        **kwargs: Any,
    ):
        if not 1 <= min_difficulty <= max_difficulty <= MAX_DIFFICULTY:
            raise ValueError(
                f"need 1 <= min_difficulty <= max_difficulty <= {MAX_DIFFICULTY}, got {min_difficulty}, "
                f"{max_difficulty}"
            )
        if not 2 <= n_customers <= len(NAMES):
            raise ValueError(f"n_customers must be in 2..{len(NAMES)}, got {n_customers}")
        if not 2 <= n_products <= len(PRODUCTS):
            raise ValueError(f"n_products must be in 2..{len(PRODUCTS)}, got {n_products}")
        if n_orders < 1 or max_rows < 1 or query_timeout_s <= 0:
            raise ValueError("n_orders and max_rows must be >= 1 and query_timeout_s > 0")
        self.min_difficulty = int(min_difficulty)
        self.max_difficulty = int(max_difficulty)
        self.n_customers = int(n_customers)
        self.n_products = int(n_products)
        self.n_orders = int(n_orders)
        self.max_rows = int(max_rows)
        self.query_timeout_s = float(query_timeout_s)
        self.conn: sqlite3.Connection | None = None
        self.db_path: Path | None = None
        self._tmpdir: str | None = None
        self._cleanup: weakref.finalize | None = None
        super().__init__(max_turns=max_turns, **kwargs)

    # ---------------------------------------------------------------- task
    def new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if "difficulty" in options:
            difficulty = int(options["difficulty"])
            if not 1 <= difficulty <= MAX_DIFFICULTY:
                raise ValueError(
                    f"options['difficulty'] must be in 1..{MAX_DIFFICULTY}, got {difficulty}"
                )
        else:
            difficulty = int(rng.integers(self.min_difficulty, self.max_difficulty + 1))
        want_eval = options.get("split") == "eval"
        while True:
            shop = self._draw_shop(rng)
            question, plan, answer = _draw_question(rng, shop, difficulty)
            digest = hashlib.sha256(json.dumps([shop.__dict__, question]).encode()).hexdigest()
            if (int(digest, 16) % EVAL_SHARE == 0) == want_eval:
                break
        return Task(
            id=f"sql-d{difficulty}-{digest[:10]}",
            prompt=question,
            answer=str(answer),
            difficulty=difficulty,
            data={"shop": shop, "plan": plan},
        )

    def _draw_shop(self, rng: np.random.Generator) -> Shop:
        names = rng.choice(NAMES, size=self.n_customers, replace=False).tolist()
        customers = [(i + 1, n, str(rng.choice(CITIES))) for i, n in enumerate(names)]
        pnames = rng.choice(PRODUCTS, size=self.n_products, replace=False).tolist()
        products = [(i + 1, n, int(rng.integers(1, 21))) for i, n in enumerate(pnames)]
        orders = [
            (
                i + 1,
                int(rng.integers(1, self.n_customers + 1)),
                int(rng.integers(1, self.n_products + 1)),
                int(rng.integers(1, 6)),
            )
            for i in range(self.n_orders)
        ]
        return Shop(customers, products, orders)

    def build_tools(self, task: Task) -> list[Tool]:
        self._open_db(task.data["shop"])
        env = self

        @tool
        def sql(query: str) -> str:
            """Run one read-only SQL query (SQLite) and return the header and rows, |-separated.

            Args:
                query: One SELECT statement.
            """
            return env.run_query(query)

        return [sql]

    def check_answer(self, task: Task, answer: str) -> bool:
        return _normalise(answer) == _normalise(task.answer)

    # ---------------------------------------------------------------- expert
    def expert_action(self, messages: list[Message]) -> str:
        """Run the task's query plan, filling each query with values read from earlier results.

        The expert reads values from the tool results in ``messages`` (it never reads the
        generated data), so it also continues correctly after replayed or student turns.
        """
        if self.task is None:
            raise RuntimeError("call reset() before expert_action()")
        results = answered_calls(messages, "sql", "query")
        values: dict[str, str] = {}
        for step in self.task.data["plan"]:
            query = step.query.format(**values)
            value = _first_cell(results.get(query))
            if value is None:
                return self.call("sql", query=query)
            values[step.out] = value
        return self.submit_call(values[self.task.data["plan"][-1].out])

    # ---------------------------------------------------------------- database
    def run_query(self, query: str) -> str:
        """Run ``query`` on this episode's database; every failure becomes result text."""
        if self.conn is None:
            return "Error: no database is open."
        query = str(query)
        if len(query) > MAX_QUERY_CHARS:
            self.error_counts["sql_error"] += 1
            return f"Error: query too long ({len(query)} characters; at most {MAX_QUERY_CHARS})."
        deadline = time.monotonic() + self.query_timeout_s
        timed_out = False

        def progress() -> int:
            nonlocal timed_out
            timed_out = time.monotonic() > deadline
            return 1 if timed_out else 0

        self.conn.set_progress_handler(progress, 1000)
        try:
            cur = self.conn.execute(query)
            header = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(self.max_rows + 1)
        except sqlite3.Error as e:
            if timed_out:
                self.error_counts["sql_timeout"] += 1
                return (
                    f"Error: query stopped after {self.query_timeout_s:g} s (time limit). "
                    "Write a simpler query."
                )
            self.error_counts["sql_error"] += 1
            return f"Error: {_explain(e)}"
        except Exception as e:  # noqa: BLE001 - e.g. a query with NUL characters
            self.error_counts["sql_error"] += 1
            return f"Error: {type(e).__name__}: {e}"
        finally:
            self.conn.set_progress_handler(None, 0)
        if not header:
            return "OK (no result set)."
        lines = ["|".join(_cell(h) for h in header)]
        lines += ["|".join(_cell(v) for v in row) for row in rows[: self.max_rows]]
        if not rows:
            lines.append("(no rows)")
        elif len(rows) > self.max_rows:
            lines.append(f"(only the first {self.max_rows} rows are shown)")
        return "\n".join(lines)

    def _open_db(self, shop: Shop) -> None:
        self.close_episode()
        self._tmpdir = tempfile.mkdtemp(prefix="agentopd-sql-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self.db_path = Path(self._tmpdir) / "shop.db"
        with sqlite3.connect(self.db_path) as w:
            w.executescript(
                "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
                "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT);"
                "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price INTEGER);"
                "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER "
                "REFERENCES customers(id), product_id INTEGER REFERENCES products(id), "
                "qty INTEGER);"
            )
            w.executemany("INSERT INTO customers VALUES (?, ?, ?)", shop.customers)
            w.executemany("INSERT INTO products VALUES (?, ?, ?)", shop.products)
            w.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", shop.orders)
        w.close()
        # Tools run in worker threads; calls are serialised by the rollout, never concurrent.
        conn = sqlite3.connect(
            f"{self.db_path.as_uri()}?mode=ro", uri=True, check_same_thread=False
        )
        conn.execute("PRAGMA query_only = ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(_authorize)
        self.conn = conn

    def close_episode(self) -> None:
        if self.conn is not None:
            try:
                self.conn.interrupt()
                self.conn.close()
            except sqlite3.Error:
                pass
            self.conn = None
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self._tmpdir = None
        self.db_path = None

    def _tool_names_hint(self) -> list[str]:
        return ["sql", self.answer_tool or "submit"]


# -------------------------------------------------------------------- questions
def _draw_question(
    rng: np.random.Generator, shop: Shop, difficulty: int
) -> tuple[str, list[Step], int | str]:
    """A templated question, the expert's query plan and the answer computed in Python.

    Names are quoted as the query will quote them (``'jon'``), so the text the model copies into
    its SQL is the same tokens in both places (unquoted, the BPE would merge the space into it).
    """
    cust = {c[0]: c for c in shop.customers}
    prod = {p[0]: p for p in shop.products}
    if difficulty >= 4:
        return _draw_long_question(rng, shop, difficulty)
    kind = int(rng.integers(0, 3))
    if difficulty == 1:
        if kind == 0:
            _, name, city = shop.customers[int(rng.integers(len(shop.customers)))]
            return (
                f"Which city is '{name}' from?",
                [Step(f"SELECT city FROM customers WHERE name = '{name}'", "a")],
                city,
            )
        if kind == 1:
            _, pname, price = shop.products[int(rng.integers(len(shop.products)))]
            return (
                f"What is the price of a '{pname}'?",
                [Step(f"SELECT price FROM products WHERE name = '{pname}'", "a")],
                price,
            )
        city = shop.customers[int(rng.integers(len(shop.customers)))][2]
        return (
            f"How many customers live in '{city}'?",
            [Step(f"SELECT COUNT(*) FROM customers WHERE city = '{city}'", "a")],
            sum(c[2] == city for c in shop.customers),
        )
    if difficulty == 2:
        if kind == 0:
            cid, name, _ = shop.customers[int(rng.integers(len(shop.customers)))]
            return (
                f"How many orders has '{name}' placed?",
                [
                    Step(f"SELECT id FROM customers WHERE name = '{name}'", "cid"),
                    Step("SELECT COUNT(*) FROM orders WHERE customer_id = {cid}", "a"),
                ],
                sum(o[1] == cid for o in shop.orders),
            )
        oid, cid, pid, _ = shop.orders[int(rng.integers(len(shop.orders)))]
        if kind == 1:
            return (
                f"What is the price of the product in order {oid}?",
                [
                    Step(f"SELECT product_id FROM orders WHERE id = {oid}", "pid"),
                    Step("SELECT price FROM products WHERE id = {pid}", "a"),
                ],
                prod[pid][2],
            )
        return (
            f"Which city is the customer of order {oid} from?",
            [
                Step(f"SELECT customer_id FROM orders WHERE id = {oid}", "cid"),
                Step("SELECT city FROM customers WHERE id = {cid}", "a"),
            ],
            cust[cid][2],
        )
    _, cid, pid, _ = shop.orders[int(rng.integers(len(shop.orders)))]
    name = cust[cid][1]
    if kind < 2:
        pname = prod[pid][1]
        return (
            f"How many '{pname}' units did '{name}' order in total?",
            [
                Step(f"SELECT id FROM customers WHERE name = '{name}'", "cid"),
                Step(f"SELECT id FROM products WHERE name = '{pname}'", "pid"),
                Step(
                    "SELECT SUM(qty) FROM orders WHERE customer_id = {cid} AND product_id = {pid}",
                    "a",
                ),
            ],
            sum(o[3] for o in shop.orders if o[1] == cid and o[2] == pid),
        )
    first = min(o for o in shop.orders if o[1] == cid)
    return (
        f"What is the price of the product in the first order of '{name}'?",
        [
            Step(f"SELECT id FROM customers WHERE name = '{name}'", "cid"),
            Step(
                "SELECT product_id FROM orders WHERE customer_id = {cid} ORDER BY id LIMIT 1", "pid"
            ),
            Step("SELECT price FROM products WHERE id = {pid}", "a"),
        ],
        prod[first[2]][2],
    )


def _draw_long_question(
    rng: np.random.Generator, shop: Shop, difficulty: int
) -> tuple[str, list[Step], int | str]:
    """Difficulty 4 or 5: customer -> first order's product -> that product's last buyer ->
    (4) their city, or (5) the price of the product of their first order."""
    cust = {c[0]: c for c in shop.customers}
    prod = {p[0]: p for p in shop.products}
    for _ in range(20):  # prefer a chain that moves to another customer (else a query repeats)
        cid = shop.orders[int(rng.integers(len(shop.orders)))][1]
        pid = min(o for o in shop.orders if o[1] == cid)[2]
        cid2 = max(o for o in shop.orders if o[2] == pid)[1]
        if cid2 != cid:
            break
    name = cust[cid][1]
    plan = [
        Step(f"SELECT id FROM customers WHERE name = '{name}'", "cid"),
        Step("SELECT product_id FROM orders WHERE customer_id = {cid} ORDER BY id LIMIT 1", "pid"),
        Step(
            "SELECT customer_id FROM orders WHERE product_id = {pid} ORDER BY id DESC LIMIT 1",
            "cid2",
        ),
    ]
    lead = f"Take the product of the first order of '{name}', and the customer of the last order of that product"
    if difficulty == 4:
        plan.append(Step("SELECT city FROM customers WHERE id = {cid2}", "a"))
        return f"{lead}. Which city is that customer from?", plan, cust[cid2][2]
    pid2 = min(o for o in shop.orders if o[1] == cid2)[2]
    plan += [
        Step("SELECT product_id FROM orders WHERE customer_id = {cid2} ORDER BY id LIMIT 1", "pid2"),
        Step("SELECT price FROM products WHERE id = {pid2}", "a"),
    ]
    return (
        f"{lead}. What is the price of the product in that customer's first order?",
        plan,
        prod[pid2][2],
    )


# -------------------------------------------------------------------- helpers
def _authorize(
    action: int, arg1: str | None, arg2: str | None, db: str | None, src: str | None
) -> int:
    if action in (
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_RECURSIVE,
    ):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _ALLOWED_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _explain(e: Exception) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    if any(w in low for w in ("not authorized", "authorization denied", "readonly", "read-only")):
        return f"{text}. The database is read-only: only SELECT queries are allowed."
    if "one statement at a time" in low:
        return "only one statement per query is allowed."
    return text


def _cell(value: Any) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    text = text.replace("\n", " ").replace("|", "/")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def _normalise(answer: Any) -> str:
    text = str(answer).strip().strip("\"'.").strip().lower()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.6g}"


def _first_cell(result: str | None) -> str | None:
    """The first cell of the first row of a successful result, else ``None``."""
    if result is None or result.startswith("Error"):
        return None
    lines = result.split("\n")
    if len(lines) < 2 or lines[1].startswith("("):
        return None
    return lines[1].split("|")[0]
