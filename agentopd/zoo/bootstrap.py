"""Teacher bootstrap: train a zoo preset by SFT on an environment's scripted expert.

``agentopd.zoo.build("tiny-teacher-<env>")`` lands here. The recipe, top to bottom, uses the
product's own pieces, so a teacher is trained and judged exactly as the trainer would do it:

1. Play ``train_episodes`` expert episodes (``split="train"``) with
   :func:`agentopd.rollout.expert_episodes`: token-exact, mask 1 on the expert's assistant
   tokens (end-of-turn included) and 0 elsewhere; only the successful ones are kept. With
   ``recovery_episodes > 0`` (the ``recovery`` variant, ``tiny-teacher-<env>-recovery``),
   as many more tasks are played with injected student-like errors
   (:func:`agentopd.zoo.recovery.recovery_episodes`): the errors get mask 0, the expert's
   recovery mask 1, so the teacher learns to continue from a mistake and never to make one.
2. :meth:`agentopd.learner.Learner.step_sft` on seeded random batches: the packed SFT pass of
   :mod:`agentopd.sft`, AdamW and the learner's warm-up + cosine schedule (``Recipe.optim``).
   Optionally (``copy_batch > 0``) every step adds a group of synthetic copy drills
   (:func:`copy_sequence`) with dense copy supervision, averaged on its own.
3. Greedy evaluation on ``eval_episodes`` held-out tasks (``split="eval"``) with
   :func:`agentopd.metrics.evaluate` and the ``hf`` engine (:func:`held_out_success`).
4. Save ``save_pretrained`` weights, the tokenizer and ``zoo.json`` (recipe and results) to a
   temporary directory next to the target, then rename it into place.

Run it directly (``--help`` lists every recipe and optimizer flag)::

    python -m agentopd.zoo.bootstrap lookup-chain --steps 300 --out /tmp/teacher
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, LearnerConfig
from agentopd.metrics import evaluate
from agentopd.registry import make
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, expert_episodes
from agentopd.runs import atomic_directory
from agentopd.sft import SftGroup
from agentopd.types import Episode, Segment
from agentopd.zoo.models import build_model, cache_dir
from agentopd.zoo.tokenizer import load_tokenizer


class _RecipeLike(Protocol):
    """A recipe dataclass: its own fields and an ``optim`` :class:`LearnerConfig`."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    optim: LearnerConfig


R = TypeVar("R", bound=_RecipeLike)


def sft_optim(**changes: Any) -> LearnerConfig:
    """The zoo's SFT optimizer: AdamW (betas 0.9/0.95, weight decay 0.01, gradient norm clipped
    to 1), peak lr 2e-3 after 20 warm-up steps, cosine decay to 5%, whole batches per forward,
    float32; ``changes`` replace any of these."""
    base = LearnerConfig(
        name="adamw", lr=2e-3, weight_decay=0.01, warmup_steps=20, schedule="cosine",
        min_lr_frac=0.05, micro_batch=64, sft_bf16="off",
    )  # fmt: skip
    return replace(base, **changes)


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
    """Optimizer steps (also the length of the learning-rate schedule)."""
    batch_size: int = 16
    """Episodes per step."""
    optim: LearnerConfig = field(default_factory=sft_optim)
    """The learner's optimizer, schedule and SFT precision (``sft_bf16``: ``auto`` for
    bfloat16 autocast only where the device runs it natively)."""
    eval_episodes: int = 64
    """Held-out tasks for the greedy success rate (0: skip)."""
    max_new_tokens: int = 96
    """Generation limit per turn at evaluation."""
    seed: int = 0
    """Seeds the init, the task draws and the batch order."""
    copy_batch: int = 0
    """Synthetic copy drills added to every step as their own group (see :func:`copy_sequence`);
    0: none."""
    copy_weight: float = 1.0
    """Weight of the copy drills' mean loss next to the expert episodes' mean loss."""
    group_by_length: bool = False
    """Draw batches without replacement from pools of ``8 * batch_size`` shuffled episodes
    sorted by length (see :func:`length_grouped_batches`; little to gain now that SFT packs
    rows); False (every recipe): independent uniform draws with replacement."""
    data_workers: int = 4
    """Threads playing expert episodes (environments that wait on tool processes, such as
    ``code-sandbox``, overlap); the data is the same for any value."""
    recovery_episodes: int = 0
    """Error-injected expert episodes (other train tasks than the clean ones) added to the
    training data; their injected turns carry no loss. 0: clean expert episodes only."""
    recovery_error_rate: float = 0.3
    """Probability that a non-final expert turn of a recovery episode is replaced by an error."""
    recovery_max_errors: int = 2
    """At most this many errors per recovery episode (the turn limit grows by as much)."""


RECIPES: dict[str, Recipe] = {
    "lookup-chain": Recipe(
        env_kwargs={"min_hops": 1, "max_hops": 3}, train_episodes=1000, steps=300,
        optim=sft_optim(lr=1e-3, min_lr_frac=0.5),
    ),
    "sql": Recipe(
        train_episodes=1000, steps=400, copy_batch=8, optim=sft_optim(lr=1e-3, min_lr_frac=0.5)
    ),
    "code-sandbox": Recipe(
        train_episodes=1500, steps=350, optim=sft_optim(min_lr_frac=0.1, sft_bf16="auto")
    ),
}  # fmt: skip
"""Per-environment defaults; other environments get ``Recipe()``. All start from the shipped
``tiny-teacher-base`` (which can already copy from its context), and each is expected to reach
at least 90% held-out greedy success on its environment (``tests/test_zoo.py`` holds the shipped
teachers to it). The shipped ``zoo.json`` of each teacher records its build; the measurements and
the recipes that did not work are in ``docs/zoo.md``."""


VARIANTS = ("recovery",)
"""Artifact variants ``<preset>-<env>-<variant>`` (see :func:`recipe_for`)."""

RECOVERY_RECIPES: dict[str, Recipe] = {
    "lookup-chain": replace(RECIPES["lookup-chain"], recovery_episodes=600),
    "sql": replace(
        RECIPES["sql"], recovery_episodes=600, init="tiny-teacher-sql", steps=150,
        optim=sft_optim(lr=5e-4, warmup_steps=10, min_lr_frac=0.1),
    ),
    "code-sandbox": replace(
        RECIPES["code-sandbox"], recovery_episodes=750, init="tiny-teacher-code-sandbox",
        steps=150, optim=sft_optim(lr=5e-4, warmup_steps=10, min_lr_frac=0.1, sft_bf16="auto"),
    ),
}  # fmt: skip
"""The ``recovery`` variant of each built-in recipe: the plain recipe's clean episodes plus
error-injected expert episodes (``recovery_episodes``) on other train tasks. lookup-chain keeps
the plain steps and optimizer and starts from the base; sql and code-sandbox continue from
their plain teacher for 150 steps at a lower peak lr (from the base, sql's 400 steps reached
only 86% clean success, docs/long_horizon.md). Other environments get their plain recipe with
``recovery_episodes=500``."""


def recipe_for(env_name: str, variant: str = "") -> Recipe:
    """The recipe of artifact ``<preset>-<env_name>[-<variant>]`` (``variant`` ``""``: plain).

    Raises:
        ValueError: ``variant`` is not ``""`` or one of :data:`VARIANTS`.
    """
    if variant == "":
        return RECIPES.get(env_name, Recipe())
    if variant == "recovery":
        return RECOVERY_RECIPES.get(
            env_name, replace(RECIPES.get(env_name, Recipe()), recovery_episodes=500)
        )
    raise ValueError(f"unknown artifact variant {variant!r}: expected '' or one of {VARIANTS}")


def with_overrides(recipe: R, overrides: dict[str, Any]) -> R:
    """``recipe`` (a dataclass with an ``optim`` :class:`LearnerConfig`) with ``overrides``
    applied: a recipe field by its name, an optimizer field (``lr``, ``min_lr_frac``, ...)
    by its own.

    Raises:
        TypeError: A key that is neither, with the nearest valid one.
    """
    own = {f.name for f in dataclasses.fields(recipe)} - {"optim"}
    optim = {f.name for f in dataclasses.fields(LearnerConfig)}
    unknown = sorted(set(overrides) - own - optim)
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(own | optim), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise TypeError(
            f"unknown recipe key {unknown[0]!r}: expected a field of {type(recipe).__name__} "
            f"or of LearnerConfig{hint}"
        )
    mine = {k: v for k, v in overrides.items() if k in own}
    theirs = {k: v for k, v in overrides.items() if k not in own}
    return replace(recipe, **mine, optim=replace(recipe.optim, **theirs))


def add_recipe_flags(parser: argparse.ArgumentParser, recipe_cls: type, skip: set[str]) -> None:
    """``--flag`` options for the scalar fields of ``recipe_cls`` and of :class:`LearnerConfig`
    (default None: unchanged); booleans are switches."""
    kinds: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}
    for f in [*dataclasses.fields(recipe_cls), *dataclasses.fields(LearnerConfig)]:
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", default=None)
        elif f.type in kinds:
            choices = f.metadata.get("choices")
            parser.add_argument(
                flag, dest=f.name, type=kinds[f.type], default=None, choices=choices,
                help=f.metadata.get("help"),
            )  # fmt: skip


# ---------------------------------------------------------------------------- data
def as_episode(tokens: list[int], mask: list[int], source: str) -> Episode:
    """A token sequence with its loss mask as a one-segment :class:`Episode` (``env=source``),
    the form :meth:`Learner.step_sft` trains on."""
    segment = Segment(tokens=list(tokens), logprobs=[0.0] * len(tokens), mask=list(mask))
    return Episode(env=source, task_id="", segments=[segment], success=True)


def play_experts(
    env_name: str,
    env_kwargs: dict[str, Any],
    seeds: list[int],
    workers: int = 1,
    on_episode: Callable[[], None] | None = None,
    chunk: int = 8,
    tokenizer: Any = None,
) -> list[Episode]:
    """One expert episode per seed (``split="train"``), in seed order.

    ``workers`` threads each play a contiguous share of the seeds, ``chunk`` episodes at a
    time, through :func:`agentopd.rollout.expert_episodes` with their own tokenizer and
    renderer; the result does not depend on ``workers`` or ``chunk``. Threads pay off where the
    environment waits on a tool process (a sandboxed Python worker); ``on_episode`` is called
    once per episode when its chunk is done (from any thread). ``tokenizer`` renders the
    episodes (default: the zoo tokenizer).
    """
    from concurrent.futures import ThreadPoolExecutor

    def play(share: list[int]) -> list[Episode]:
        renderer = Renderer(tokenizer if tokenizer is not None else load_tokenizer())
        config = RolloutConfig(
            max_new_tokens=10_000, max_episode_tokens=100_000, tool_workers=chunk
        )
        out: list[Episode] = []
        for i in range(0, len(share), chunk):
            jobs = [
                EpisodeJob(env_name, s, {"split": "train"}, dict(env_kwargs))
                for s in share[i : i + chunk]
            ]
            out += expert_episodes(jobs, renderer, config)
            for _ in jobs:
                if on_episode is not None:
                    on_episode()
        return out

    workers = max(1, min(workers, len(seeds)))
    size = math.ceil(len(seeds) / workers)
    shares = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    if len(shares) == 1:
        return play(shares[0])
    with ThreadPoolExecutor(len(shares)) as pool:
        return [ep for part in pool.map(play, shares) for ep in part]


def training_episodes(
    env_name: str,
    recipe: Recipe,
    renderer: Renderer,
    on_episode: Callable[[], None] | None = None,
) -> tuple[list[Episode], list[Episode]]:
    """The successful episodes a build trains on: ``(clean, recovery)``.

    ``clean``: one expert episode per train task seed ``seed * 10_000_019 + i``,
    ``i < train_episodes`` (:func:`play_experts`). ``recovery``: one error-injected episode
    (:func:`agentopd.zoo.recovery.recovery_episodes`) per the next ``recovery_episodes`` seeds,
    with ``recovery_error_rate`` and ``recovery_max_errors``; their injected turns have mask 0.
    Both are deterministic in the recipe and do not depend on ``data_workers``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from agentopd.zoo.recovery import recovery_episodes

    first = recipe.seed * 10_000_019
    clean = play_experts(
        env_name, recipe.env_kwargs, list(range(first, first + recipe.train_episodes)),
        recipe.data_workers, on_episode=on_episode,
    )  # fmt: skip
    seeds = list(range(first + recipe.train_episodes,
                       first + recipe.train_episodes + recipe.recovery_episodes))  # fmt: skip
    recovery: list[Episode] = []
    if seeds:
        workers = max(1, min(recipe.data_workers, len(seeds)))
        size = math.ceil(len(seeds) / workers)

        def play(share: list[int]) -> list[Episode]:
            eps = recovery_episodes(
                env_name, recipe.env_kwargs, share, renderer, recipe.recovery_error_rate,
                recipe.recovery_max_errors, seed=recipe.seed,
            )  # fmt: skip
            for _ in eps:
                if on_episode is not None:
                    on_episode()
            return eps

        shares = [seeds[i : i + size] for i in range(0, len(seeds), size)]
        with ThreadPoolExecutor(len(shares)) as pool:
            recovery = [ep for part in pool.map(play, shares) for ep in part]
    return [ep for ep in clean if ep.success], [ep for ep in recovery if ep.success]


@functools.lru_cache(maxsize=4)
def _vocab_words(tokenizer: Any) -> list[str]:
    """Lowercase words of 3+ letters that are a single token of ``tokenizer``, sorted."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) >= 3 and text.isalpha() and text.islower():
            words.append(text)
    return sorted(set(words))


def copy_sequence(tokenizer: Any, rng: random.Random, max_keys: int = 8) -> Episode:
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
    return as_episode(head + tail, [0] * len(head) + [1] * len(tail), "copy-drill")


# ---------------------------------------------------------------------------- training
def train(
    model: torch.nn.Module,
    episodes: list[Episode],
    recipe: Recipe,
    pad_id: int,
    on_step: Callable[[float], None] | None = None,
    copy_drills: list[Episode] | None = None,
) -> list[float]:
    """``recipe.steps`` :meth:`Learner.step_sft` updates on seeded batches of ``episodes``;
    returns the episodes' mean loss per step.

    With ``copy_drills`` and ``recipe.copy_batch > 0``, every step adds ``copy_batch`` of them
    as a group of weight ``recipe.copy_weight``. ``on_step`` gets each step's loss.
    """
    learner = Learner(model, recipe.optim, pad_id, total_steps=recipe.steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    batches: Iterator[list[int]]
    if recipe.group_by_length:
        lengths = [sum(len(s.tokens) for s in ep.segments) for ep in episodes]
        batches = length_grouped_batches(lengths, recipe.batch_size, gen)
    else:
        batches = (
            torch.randint(len(episodes), (recipe.batch_size,), generator=gen).tolist()
            for _ in itertools.count()
        )
    losses: list[float] = []
    for _ in range(recipe.steps):
        batch = [episodes[i] for i in next(batches)]
        extra = []
        if copy_drills and recipe.copy_batch > 0:
            idx = torch.randint(len(copy_drills), (recipe.copy_batch,), generator=gen).tolist()
            extra = [SftGroup([copy_drills[i] for i in idx], recipe.copy_weight, "copy")]
        losses.append(learner.step_sft(batch, extra)["learner/loss"])
        if on_step is not None:
            on_step(losses[-1])
    model.eval()
    return losses


def length_grouped_batches(
    lengths: list[int], batch_size: int, gen: torch.Generator, pool: int = 8
) -> Iterator[list[int]]:
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


# ---------------------------------------------------------------------------- evaluation
def held_out_success(
    model: Any,
    tokenizer: Any,
    env_name: str,
    episodes: int,
    env_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = 96,
    dtype: torch.dtype | None = None,
    *,
    recovery: bool = False,
) -> dict[str, Any]:
    """Greedy :func:`agentopd.metrics.evaluate` report on ``episodes`` held-out tasks (seeds
    ``0..episodes-1`` of ``split="eval"``) with the ``hf`` engine: ``success``,
    ``success_by_difficulty``, ``mean_turns``, ``stop_reasons``, ...; ``dtype``: generate with
    a copy of the model in that dtype (see :class:`HFEngine`).

    With ``recovery``, ``report["recovery"]`` is the greedy recovery rate on the same tasks, each
    started right after one injected error (:func:`agentopd.zoo.recovery.recovery_jobs`; keys
    as :func:`agentopd.zoo.recovery.recovery_rate`)."""
    from agentopd.rollout import run_episodes
    from agentopd.zoo.recovery import recovery_jobs, recovery_rate

    renderer = Renderer(tokenizer)
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id, max_batch_size=64, dtype=dtype)
    limits = RolloutConfig(max_new_tokens=max_new_tokens, max_episode_tokens=2048, temperature=0.0)
    report, _ = evaluate(
        env_name, env_kwargs or {}, engine, renderer, episodes=episodes, temperature=0.0,
        rollout_config=limits,
    )  # fmt: skip
    if recovery:
        jobs = recovery_jobs(env_name, env_kwargs or {}, range(episodes), split="eval")
        report["recovery"] = recovery_rate(run_episodes(jobs, engine, renderer, limits, seed=0))
    return report


# ---------------------------------------------------------------------------- build
def build_artifact(
    env_name: str,
    path: Path | None = None,
    *,
    preset: str | None = None,
    variant: str = "",
    progress: bool = True,
    half: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``preset`` on ``env_name``'s expert and save it atomically to ``path``.

    Args:
        env_name: Registered environment name.
        path: Target directory (default: the cache dir of ``<preset>-<env_name>[-<variant>]``).
        preset: Model preset (default: the recipe's).
        variant: ``""`` (plain) or one of :data:`VARIANTS` (see :func:`recipe_for`).
        progress: Show a rich progress bar and a summary line.
        half: Save float16 weights (the form shipped in ``agentopd/zoo/assets/models``).
        **overrides: :class:`Recipe` fields and :class:`LearnerConfig` fields (see
            :func:`with_overrides`).

    Returns:
        The report saved as ``zoo.json``: recipe, timings, data statistics, final loss and the
        held-out greedy evaluation.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    recipe = with_overrides(recipe_for(env_name, variant), overrides)
    if preset is not None:
        recipe = replace(recipe, preset=preset)
    name = f"{recipe.preset}-{env_name}" + (f"-{variant}" if variant else "")
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
        total = recipe.train_episodes + recipe.recovery_episodes
        task = bar.add_task(f"{name}: expert episodes", total=total, loss="")
        clean, recovery = training_episodes(
            env_name, recipe, renderer, on_episode=lambda: bar.update(task, advance=1)
        )
        episodes = clean + recovery
        if not clean:
            raise RuntimeError(
                f"the {env_name} expert solved none of {recipe.train_episodes} tasks"
            )
        t_data = time.perf_counter() - t0

        # ------------------------------------------------------------ train
        model = initial_model(recipe)
        task = bar.add_task(f"{name}: SFT", total=recipe.steps, loss="")
        copy_rng = random.Random(recipe.seed)
        drills = [
            copy_sequence(tokenizer, copy_rng) for _ in range(min(4096, recipe.copy_batch * 256))
        ]
        losses = train(
            model, episodes, recipe, renderer.pad_id,
            lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}"), drills,
        )  # fmt: skip
        t_train = time.perf_counter() - t0 - t_data

        # ------------------------------------------------------------ evaluate
        evaluation: dict[str, Any] = {}
        if recipe.eval_episodes > 0:
            task = bar.add_task(f"{name}: greedy eval", total=1, loss="")
            evaluation = held_out_success(
                model, tokenizer, env_name, recipe.eval_episodes, recipe.env_kwargs,
                recipe.max_new_tokens, recovery=True,
            )  # fmt: skip
            bar.update(task, advance=1, loss=f"success {evaluation['success']:.1%}")
    t_eval = time.perf_counter() - t0 - t_data - t_train

    tokens = [sum(len(s.tokens) for s in ep.segments) for ep in episodes]
    report: dict[str, Any] = {
        "name": name,
        "env": env_name,
        "recipe": asdict(recipe),
        "train_examples": len(episodes),
        "expert_failures": total - len(episodes),
        "recovery_examples": len(recovery),
        "injected_errors": sum(len(ep.info["injected_turns"]) for ep in recovery),
        "mean_tokens": sum(tokens) / len(episodes),
        "mean_loss_tokens": sum(ep.num_sampled_tokens for ep in episodes) / len(episodes),
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
            f"on {evaluation['episodes']} tasks, recovery rate "
            f"{evaluation['recovery']['recovery_rate']:.1%}, in "
            f"{report['seconds']['total']:.0f}s -> {path}"
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
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "zoo.json").write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    """``python -m agentopd.zoo.bootstrap ENV [--steps N ...]``: build one teacher."""
    p = argparse.ArgumentParser(description="Bootstrap a zoo teacher by SFT on an env's expert.")
    p.add_argument("env")
    p.add_argument("--out", type=Path, default=None, help="target directory (default: cache)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--half", action="store_true", help="save float16 weights (shipped form)")
    p.add_argument("--variant", default="", choices=("", *VARIANTS), help="artifact variant")
    add_recipe_flags(p, Recipe, skip={"env_kwargs", "optim", "name", "epochs_per_batch"})
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k not in ("env", "preset", "out", "threads", "half", "variant") and v is not None
    }
    report = build_artifact(
        args.env, args.out, preset=args.preset, variant=args.variant, half=args.half, **overrides
    )
    print(json.dumps({k: report[k] for k in ("name", "eval", "seconds", "final_loss")}, indent=2))


if __name__ == "__main__":
    main()
