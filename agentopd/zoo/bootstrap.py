"""Teacher bootstrap: train a zoo preset by SFT on an environment's scripted expert.

``agentopd.zoo.build("tiny-teacher-<env>")`` lands here. The recipe, top to bottom:

1. Play ``train_episodes`` expert episodes (``split="train"``) through the renderer, so the
   training data is token-exact exactly as the rollout loop would produce it; the loss mask is 1
   on the expert's assistant tokens (end-of-turn included) and 0 elsewhere.
2. Masked next-token cross-entropy, AdamW, linear warm-up then cosine decay, random batches of
   right-padded sequences, seeded. Optionally (``copy_batch > 0``) every step adds a few
   synthetic copy drills (:func:`copy_sequence`) with dense copy supervision.
3. Greedy evaluation on ``eval_episodes`` held-out tasks (``split="eval"``).
4. Save ``save_pretrained`` weights, the tokenizer and ``zoo.json`` (recipe and results) to a
   temporary directory next to the target, then rename it into place.

Run it directly::

    python -m agentopd.zoo.bootstrap lookup-chain --steps 300
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agentopd.env import Env
from agentopd.registry import make
from agentopd.renderer import Renderer
from agentopd.zoo.models import build_model, cache_dir
from agentopd.zoo.tokenizer import load_tokenizer


@dataclass
class Recipe:
    """How to bootstrap one teacher."""

    preset: str = "tiny-teacher"
    """Model preset to train."""
    init: str = "base"
    """Starting weights: ``base`` (the preset's pretrained base, ``<preset>-base``, shipped),
    ``random`` (the preset's seeded init) or any name or path :func:`agentopd.zoo.load` takes."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor kwargs of the environment (for training and evaluation)."""
    train_episodes: int = 2000
    """Expert episodes (distinct train tasks) to train on."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up before the cosine decay."""
    min_lr_frac: float = 0.05
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_episodes: int = 64
    """Held-out tasks for the greedy success rate (0: skip)."""
    max_new_tokens: int = 96
    """Generation limit per turn at evaluation."""
    seed: int = 0
    """Seeds the init, the task draws and the batch order."""
    copy_batch: int = 0
    """Synthetic copy sequences added to every batch (see :func:`copy_sequence`); 0: none."""
    copy_weight: float = 1.0
    """Weight of the copy loss next to the expert loss."""
    group_by_length: bool = False
    """Draw batches without replacement from pools of ``8 * batch_size`` shuffled examples sorted
    by length (see :func:`length_grouped_batches`; little left to gain now that
    :func:`masked_nll` packs rows); False (every recipe): independent uniform draws with
    replacement."""
    bf16: str = "off"
    """Mixed precision for the forward pass: ``on`` uses bfloat16 autocast, ``auto`` only where
    the device runs it natively (CUDA, or a CPU with AVX512-BF16/AMX; the code-sandbox recipe),
    ``off`` never. Weights, optimizer state and the loss stay float32."""
    data_workers: int = 4
    """Threads playing expert episodes (environments that wait on tool processes, such as
    ``code-sandbox``, overlap); the data is the same for any value."""


RECIPES: dict[str, Recipe] = {
    "lookup-chain": Recipe(
        env_kwargs={"min_hops": 1, "max_hops": 3},
        train_episodes=1000,
        steps=300,
        lr=1e-3,
        min_lr_frac=0.5,
        eval_episodes=64,
    ),
    "sql": Recipe(
        train_episodes=1000, steps=400, lr=1e-3, min_lr_frac=0.5, eval_episodes=64, copy_batch=8
    ),
    "code-sandbox": Recipe(
        train_episodes=1500, steps=350, lr=2e-3, min_lr_frac=0.1, eval_episodes=64, bf16="auto"
    ),
}
"""Per-environment defaults; other environments get ``Recipe()``. All start from the shipped
``tiny-teacher-base`` (which can already copy from its context), and each is expected to reach
at least 90% held-out greedy success on its environment (``tests/test_zoo.py`` holds the shipped
teachers to it). The shipped ``zoo.json`` of each teacher records its build; the measurements and
the recipes that did not work are in ``docs/zoo.md``."""


@dataclass
class SftExample:
    """One token sequence with its loss mask."""

    tokens: list[int]
    mask: list[int]


# ---------------------------------------------------------------------------- data
def expert_sequence(
    env: Env, renderer: Renderer, seed: int, options: dict[str, Any] | None = None
) -> tuple[list[int], list[int], bool]:
    """One expert episode as ``(tokens, mask, success)`` through the renderer.

    This mirrors ``agentopd.rollout.expert_episode`` (initial prompt, then per turn the expert's
    encoded text plus the end-of-turn token with mask 1, then bridge tokens with mask 0). It is
    kept separate because the zoo only needs the token stream, and so that a teacher can be
    built while the rollout loop evolves.
    """
    messages, info = env.reset(seed=seed, options={"split": "train", **(options or {})})
    tools = info.get("tools") or []
    tokens, stream = renderer.initial_prompt(messages, tools)
    tokens = list(tokens)
    mask = [0] * len(tokens)
    success = False
    while True:
        text = env.expert_action(list(env.messages))
        turn = renderer.encode(text) + [renderer.eot_id]
        tokens += turn
        mask += [1] * len(turn)
        stream += renderer.decode(turn)
        _, reward, terminated, truncated, step_info = env.step(text)
        if terminated or truncated:
            success = bool(step_info.get("success", reward > 0))
            break
        bridge = renderer.bridge(stream, env.messages, tools)
        if bridge.new_segment:
            raise RuntimeError("the chat template rewrote history while bootstrapping")
        tokens += bridge.tokens
        mask += [0] * len(bridge.tokens)
        stream += bridge.text
    return tokens, mask, success


def expert_examples(
    env_name: str,
    env_kwargs: dict[str, Any],
    seeds: list[int],
    workers: int = 1,
    on_episode: Any = None,
) -> list[tuple[SftExample, bool]]:
    """``(example, success)`` of one expert episode per seed, in seed order.

    ``workers`` threads each play a contiguous share of the seeds with their own environment,
    tokenizer and renderer, so nothing is shared between threads; the result does not depend
    on ``workers``. Threads pay off where the environment waits on a tool process (a sandboxed
    Python worker); ``on_episode`` is called after each episode (from any thread).
    """
    from concurrent.futures import ThreadPoolExecutor

    def play(share: list[int]) -> list[tuple[SftExample, bool]]:
        env = make(env_name, **env_kwargs)
        renderer = Renderer(load_tokenizer())
        out = []
        try:
            for seed in share:
                tokens, mask, ok = expert_sequence(env, renderer, seed)
                out.append((SftExample(tokens, mask), ok))
                if on_episode is not None:
                    on_episode()
        finally:
            env.close()
        return out

    workers = max(1, min(workers, len(seeds)))
    size = math.ceil(len(seeds) / workers)
    shares = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    if len(shares) == 1:
        return play(shares[0])
    with ThreadPoolExecutor(len(shares)) as pool:
        return [pair for part in pool.map(play, shares) for pair in part]


@functools.lru_cache(maxsize=4)
def _vocab_words(tokenizer: Any) -> list[str]:
    """Lowercase words of 3+ letters that are a single token of ``tokenizer``, sorted."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) >= 3 and text.isalpha() and text.islower():
            words.append(text)
    return sorted(set(words))


def copy_sequence(tokenizer: Any, rng: random.Random, max_keys: int = 8) -> SftExample:
    """A synthetic copy drill: a tool message of random keys, then an assistant turn repeating them.

    Keys look like the environments' short identifiers (a letter and two digits), are numbers of
    up to six digits, or are whole words of the vocabulary (``rome``, ``lima``). Such words are
    one token each, and the letter-level drills the bases were pretrained on never ask to copy
    them; without these drills the sql teacher answered a city from its prior instead of the
    query result. The assistant turn joins the same keys with a possibly different separator, so
    the model must align by content rather than by a fixed offset, and learns to map ``" h"`` to
    ``"h"``. Every token of the assistant turn is trained: dense copy supervision makes copying
    (induction) heads form in a few hundred steps, which the sparse key tokens of expert
    episodes alone do not.
    """
    seps = [" ", ",", "\n", ", ", ""]
    words = _vocab_words(tokenizer)

    def key() -> str:
        kind = rng.randrange(3)
        if kind == 0:
            return rng.choice(words)
        if kind == 1:  # numbers of up to six digits, as tasks quote them
            return str(rng.randrange(10 ** rng.randint(1, 6)))
        return rng.choice("abcdefghijklmnopqrstuvwxyz") + f"{rng.randrange(100):02d}"

    keys = [key() for _ in range(rng.randint(1, max_keys))]
    source = rng.choice(seps).join(keys)
    target = rng.choice(seps).join(keys)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head = enc("<|im_start|>tool\n" + source + "<|im_end|>\n<|im_start|>assistant\n")
    tail = enc(target + "<|im_end|>")
    return SftExample(head + tail, [0] * len(head) + [1] * len(tail))


# ---------------------------------------------------------------------------- training
def warmup_cosine_lr(step: int, recipe: Any) -> float:
    """Linear warm-up to ``recipe.lr``, then cosine decay to ``recipe.min_lr_frac * lr`` at
    ``recipe.steps`` (any recipe with those fields: :class:`Recipe`, ``PretrainRecipe``)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_frac
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def sft(
    model: torch.nn.Module,
    examples: list[SftExample],
    recipe: Recipe,
    pad_id: int,
    progress: Any = None,
    task: Any = None,
    copy_examples: list[SftExample] | None = None,
) -> list[float]:
    """Masked next-token cross-entropy on ``examples``; returns the expert loss per step.

    With ``copy_examples`` and ``recipe.copy_batch > 0``, every step adds
    ``recipe.copy_weight`` times the loss of ``copy_batch`` of them.
    """
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, recipe)

    if recipe.group_by_length:
        batches = length_grouped_batches([len(e.tokens) for e in examples], recipe.batch_size, gen)
    else:
        batches = (
            torch.randint(len(examples), (recipe.batch_size,), generator=gen).tolist()
            for _ in itertools.count()
        )
    device = next(model.parameters()).device
    use_bf16 = _bf16_wanted(recipe.bf16, device)

    model.train()
    losses: list[float] = []
    for step in range(recipe.steps):
        idx = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = masked_nll([examples[i] for i in idx], model, pad_id)
            total = loss
            if copy_examples and recipe.copy_batch > 0:
                n = len(copy_examples)
                cidx = torch.randint(n, (recipe.copy_batch,), generator=gen).tolist()
                copy_loss = _masked_nll_full([copy_examples[i] for i in cidx], model, pad_id)
                total = loss + recipe.copy_weight * copy_loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def length_grouped_batches(
    lengths: list[int], batch_size: int, gen: torch.Generator, pool: int = 8
) -> Any:
    """Endless index batches: each epoch shuffles all examples, sorts every pool of
    ``pool * batch_size`` of them by length, cuts the pools into batches and shuffles the batches.

    Every example is seen once per epoch; a batch holds examples of similar length, so right
    padding wastes less compute, while which examples share a batch still changes from epoch to
    epoch.
    """
    n = len(lengths)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        batches = []
        for start in range(0, n, pool * size):
            chunk = sorted(order[start : start + pool * size], key=lambda i: lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        # A short last batch would make a step of fewer examples; top it up from the epoch.
        if len(batches[-1]) < size:
            batches[-1] += order[: size - len(batches[-1])]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]


def _bf16_wanted(mode: str, device: torch.device) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be 'auto', 'on' or 'off', not {mode!r}")
    if mode != "auto":
        return mode == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def masked_nll(batch: list[SftExample], model: Any, pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over the masked tokens of ``batch``, as a padded full forward gives it.

    Three savings, none of which changes the loss beyond float rounding:

    - Episodes of one environment share a long prompt (system message and tools block), so the
      shared prefix runs once with batch size 1 and its KV cache is repeated for every row;
      gradients still flow through it. The prefix stops before the first position whose *next*
      token is trained on, so no trained prediction is lost.
    - The rest of each sequence is packed with others into rows as wide as the longest one
      (first fit, longest first), with a block-diagonal causal mask and positions that restart
      after the prefix, so little compute goes to padding (measured in ``docs/zoo.md``).
    - The output projection and the softmax run only at trained positions.

    ``pad_id`` fills the unused ends of rows; those positions are never trained on.
    """
    shared = prefix_to_share(batch)
    rests = [(e.tokens[shared:], e.mask[shared:]) for e in batch]
    width = max(len(t) for t, _ in rests)
    rows = pack_rows([len(t) for t, _ in rests])
    tokens_R_W = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets_R_W = torch.full((len(rows), width), -100, dtype=torch.long)
    pos_R_W = torch.zeros((len(rows), width), dtype=torch.long)
    seg_R_W = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            toks, mask = rests[i]
            n = len(toks)
            tokens_R_W[r, at : at + n] = torch.tensor(toks)
            # Position j predicts token j+1 of the same sequence; the first token of a rest is
            # predicted from the prefix and is never trained on (see above).
            nxt = torch.tensor(toks[1:], dtype=torch.long)
            targets_R_W[r, at : at + n - 1] = torch.where(torch.tensor(mask[1:]) > 0, nxt, -100)
            pos_R_W[r, at : at + n] = torch.arange(shared, shared + n)
            seg_R_W[r, at : at + n] = s
            at += n
    causal_W_W = torch.ones((width, width), dtype=torch.bool).tril()
    same_R_W_W = (seg_R_W[:, :, None] == seg_R_W[:, None, :]) & (seg_R_W[:, :, None] >= 0)
    # Unused row ends see themselves, so no attention row is empty (an empty one gives NaN).
    allowed_R_W_W = (causal_W_W & same_R_W_W) | torch.eye(width, dtype=torch.bool)
    kwargs: dict[str, Any] = {}
    if shared:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([batch[0].tokens[:shared]]), past_key_values=cache,
              use_cache=True)  # fmt: skip
        cache.batch_repeat_interleave(len(rows))
        kwargs = {"past_key_values": cache, "use_cache": True}
        prefix_R_W_P = torch.ones((len(rows), width, shared), dtype=torch.bool)
        allowed_R_W_W = torch.cat([prefix_R_W_P, allowed_R_W_W], dim=2)
    hidden_R_W_H = model.base_model(
        input_ids=tokens_R_W, attention_mask=allowed_R_W_W[:, None], position_ids=pos_R_W,
        **kwargs,
    ).last_hidden_state  # fmt: skip
    trained_R_W = targets_R_W >= 0
    logits_N_V = model.get_output_embeddings()(hidden_R_W_H[trained_R_W])
    if logits_N_V.shape[0] == 0:
        return logits_N_V.sum() * 0.0
    return F.cross_entropy(logits_N_V.float(), targets_R_W[trained_R_W])


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows as wide as the longest: first fit, longest first."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _masked_nll_full(batch: list[SftExample], model: Any, pad_id: int) -> torch.Tensor:
    tokens_B_T, mask_B_T, attn_B_T = _batch(batch, pad_id)
    logits_B_T_V = model(input_ids=tokens_B_T, attention_mask=attn_B_T).logits
    return _nll(logits_B_T_V[:, :-1], tokens_B_T[:, 1:], mask_B_T[:, 1:])


def _nll(
    logits_B_T_V: torch.Tensor, targets_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Position t predicts token t+1; callers pass the mask of the *predicted* tokens."""
    nll = F.cross_entropy(
        logits_B_T_V.reshape(-1, logits_B_T_V.shape[-1]).float(),
        targets_B_T.reshape(-1),
        reduction="none",
    )
    m = mask_B_T.reshape(-1).float()
    return (nll * m).sum() / m.sum().clamp(min=1)


def prefix_to_share(batch: list[SftExample]) -> int:
    """The prefix :func:`masked_nll` runs once: :func:`_shared_prefix`, or 0 when under 8 tokens
    (too short to be worth a separate forward pass)."""
    shared = _shared_prefix(batch)
    return shared if shared >= 8 else 0


def _shared_prefix(batch: list[SftExample]) -> int:
    """Length of the common token prefix that holds no trained position (see masked_nll)."""
    first = batch[0].tokens
    n = min(len(e.tokens) for e in batch)
    for e in batch:
        if 1 in e.mask:
            n = min(n, e.mask.index(1) - 1)
        i = 0
        while i < n and e.tokens[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


def _batch(batch: list[SftExample], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(e.tokens) for e in batch)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.tokens)
        tokens[b, :n] = torch.tensor(e.tokens)
        mask[b, :n] = torch.tensor(e.mask)
        attn[b, :n] = 1
    return tokens, mask, attn


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_success(
    model: Any,
    tokenizer: Any,
    env_name: str,
    episodes: int,
    env_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = 96,
    split: str = "eval",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy success rate on ``episodes`` tasks of ``split`` (seeds ``0..episodes-1``).

    Returns ``{"success": rate, "episodes": n, "by_difficulty": {d: rate}, "mean_turns": t}``.
    """
    from agentopd.engines import SamplingParams
    from agentopd.engines.hf import HFEngine

    renderer = Renderer(tokenizer)
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id, max_batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    results: list[tuple[int, bool, int]] = []
    for start in range(0, episodes, batch_size):
        lives = []
        for seed in range(start, min(episodes, start + batch_size)):
            env = make(env_name, **(env_kwargs or {}))
            messages, info = env.reset(seed=seed, options={"split": split})
            tools = info.get("tools") or []
            tokens, stream = renderer.initial_prompt(messages, tools)
            lives.append(
                {"env": env, "tools": tools, "tokens": list(tokens), "stream": stream,
                 "done": False, "success": False, "turns": 0,
                 "difficulty": int(info.get("difficulty", 1))}
            )  # fmt: skip
        while any(not lv["done"] for lv in lives):
            active = [lv for lv in lives if not lv["done"]]
            samples = engine.generate([lv["tokens"] for lv in active], params)
            for lv, s in zip(active, samples, strict=True):
                lv["tokens"] += s.tokens
                lv["stream"] += renderer.decode(s.tokens)
                lv["turns"] += 1
                content, ended = renderer.strip_eot(s.tokens)
                if not (s.finished and ended):
                    lv["done"] = True
                    continue
                env = lv["env"]
                _, reward, terminated, truncated, info = env.step(renderer.decode(content))
                if terminated or truncated:
                    lv["done"] = True
                    lv["success"] = bool(info.get("success", reward > 0))
                    continue
                bridge = renderer.bridge(lv["stream"], env.messages, lv["tools"])
                lv["tokens"] += bridge.tokens
                lv["stream"] += bridge.text
                if len(lv["tokens"]) >= 2048 - max_new_tokens:
                    lv["done"] = True
        for lv in lives:
            lv["env"].close()
            results.append((lv["difficulty"], lv["success"], lv["turns"]))
    by_diff: dict[int, list[bool]] = {}
    for d, ok, _ in results:
        by_diff.setdefault(d, []).append(ok)
    return {
        "success": sum(ok for _, ok, _ in results) / max(1, len(results)),
        "episodes": len(results),
        "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_diff.items())},
        "mean_turns": sum(t for *_, t in results) / max(1, len(results)),
    }


# ---------------------------------------------------------------------------- build
def build_artifact(
    env_name: str,
    path: Path | None = None,
    *,
    preset: str | None = None,
    progress: bool = True,
    half: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``preset`` on ``env_name``'s expert and save it atomically to ``path``.

    Args:
        env_name: Registered environment name.
        path: Target directory (default: the cache dir of ``<preset>-<env_name>``).
        preset: Model preset (default: the recipe's).
        progress: Show a rich progress bar and a summary line.
        half: Save float16 weights (the form shipped in ``agentopd/zoo/assets/models``).
        **overrides: :class:`Recipe` fields.

    Returns:
        The report saved as ``zoo.json``: recipe, timings, data statistics, final loss and the
        held-out greedy success.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    recipe = replace(RECIPES.get(env_name, Recipe()), **overrides)
    if preset is not None:
        recipe = replace(recipe, preset=preset)
    name = f"{recipe.preset}-{env_name}"
    path = Path(path) if path is not None else cache_dir(name)
    console = Console(stderr=True, quiet=not progress)
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)

    tokenizer = load_tokenizer()
    renderer = Renderer(tokenizer)
    make(env_name, **recipe.env_kwargs).close()  # an unknown name or bad kwargs fail here, early
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not progress) as bar:
        # ------------------------------------------------------------ data
        task = bar.add_task(f"{name}: expert episodes", total=recipe.train_episodes, loss="")
        seeds = range(recipe.seed * 10_000_019, recipe.seed * 10_000_019 + recipe.train_episodes)
        played = expert_examples(
            env_name, recipe.env_kwargs, list(seeds), recipe.data_workers,
            on_episode=lambda: bar.update(task, advance=1),
        )  # fmt: skip
        examples = [ex for ex, ok in played if ok]
        failed = len(played) - len(examples)
        if not examples:
            raise RuntimeError(
                f"the {env_name} expert solved none of {recipe.train_episodes} tasks"
            )
        t_data = time.perf_counter() - t0

        # ------------------------------------------------------------ train
        model = initial_model(recipe)
        task = bar.add_task(f"{name}: SFT", total=recipe.steps, loss="")
        copy_rng = random.Random(recipe.seed)
        copy_examples = [
            copy_sequence(tokenizer, copy_rng) for _ in range(min(4096, recipe.copy_batch * 256))
        ]
        losses = sft(model, examples, recipe, renderer.pad_id, bar, task, copy_examples)
        t_train = time.perf_counter() - t0 - t_data

        # ------------------------------------------------------------ evaluate
        evaluation: dict[str, Any] = {}
        if recipe.eval_episodes > 0:
            task = bar.add_task(f"{name}: greedy eval", total=1, loss="")
            evaluation = greedy_success(
                model, tokenizer, env_name, recipe.eval_episodes, recipe.env_kwargs,
                recipe.max_new_tokens,
            )  # fmt: skip
            bar.update(task, advance=1, loss=f"success {evaluation['success']:.1%}")
    t_eval = time.perf_counter() - t0 - t_data - t_train

    report = {
        "name": name,
        "env": env_name,
        "recipe": asdict(recipe),
        "train_examples": len(examples),
        "expert_failures": failed,
        "mean_tokens": sum(len(e.tokens) for e in examples) / len(examples),
        "mean_loss_tokens": sum(sum(e.mask) for e in examples) / len(examples),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "loss_curve": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4)
            for i in range(0, len(losses), 50)
        ],
        "eval": evaluation,
        "seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    _save_atomically(model.half() if half else model, tokenizer, report, path)
    if evaluation:
        console.print(
            f"[green]{name}[/]: held-out greedy success {evaluation['success']:.1%} "
            f"on {evaluation['episodes']} tasks in {report['seconds']['total']:.0f}s -> {path}"
        )
    return report


def initial_model(recipe: Recipe) -> Any:
    """The weights a build starts from (see :attr:`Recipe.init`)."""
    from agentopd import zoo

    if recipe.init == "random" or (
        recipe.init == "base" and f"{recipe.preset}-base" not in zoo.BASES
    ):
        return build_model(recipe.preset, seed=recipe.seed)
    name = f"{recipe.preset}-base" if recipe.init == "base" else recipe.init
    model, _ = zoo.load(name, progress=True)
    return model.float()


def _save_atomically(model: Any, tokenizer: Any, report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "zoo.json").write_text(json.dumps(report, indent=2))
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m agentopd.zoo.bootstrap ENV [--steps N ...]``: build one teacher."""
    p = argparse.ArgumentParser(description="Bootstrap a zoo teacher by SFT on an env's expert.")
    p.add_argument("env")
    p.add_argument("--preset", default=None)
    p.add_argument("--init", default=None, help="base (default), random, or a model name/path")
    p.add_argument("--out", type=Path, default=None, help="target directory (default: cache)")
    for f in ("steps", "batch_size", "train_episodes", "eval_episodes", "seed", "warmup_steps",
              "copy_batch", "data_workers"):  # fmt: skip
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None)
    for f in ("lr", "min_lr_frac", "weight_decay", "copy_weight"):
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=float, default=None)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default=None)
    p.add_argument("--group-by-length", action="store_true", default=None,
                   help="batches of similar length (Recipe.group_by_length)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--half", action="store_true", help="save float16 weights (shipped form)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k not in ("env", "preset", "out", "threads", "half") and v is not None
    }
    report = build_artifact(args.env, args.out, preset=args.preset, half=args.half, **overrides)
    print(json.dumps({k: report[k] for k in ("name", "eval", "seconds", "final_loss")}, indent=2))


if __name__ == "__main__":
    main()
