"""Base models: a preset "pretrained" on generic synthetic copy text, before any environment.

A real student or teacher starts from a pretrained LM that can already copy a string from its
context (induction heads). A random init cannot, and learning that skill from the sparse copied
tokens of expert episodes alone takes a tiny model hundreds of optimizer steps of a long loss
plateau. So the zoo has *base* artifacts, ``<preset>-base`` (``tiny-base``,
``tiny-teacher-base``): the preset trained only on :func:`drill` sequences, chat-formatted
messages whose assistant turn repeats items (keys, numbers, words, quoted strings) found in an
earlier message, in a different layout. They know nothing about any environment's tools or
tasks; env teachers are then bootstrapped from them (:mod:`agentopd.zoo.bootstrap`), and the
default student is ``tiny-base``.

Base weights are shipped in ``agentopd/zoo/assets/models/`` (a few MB); ``python -m
agentopd.zoo.pretrain tiny --out DIR`` rebuilds one from scratch.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentopd.learner import Learner, LearnerConfig
from agentopd.sft import pad_segments
from agentopd.zoo.bootstrap import (
    add_recipe_flags,
    as_episode,
    sft_optim,
    with_overrides,
)
from agentopd.zoo.models import build_model
from agentopd.zoo.tokenizer import load_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class PretrainRecipe:
    """How to pretrain one base model."""

    steps: int = 1500
    """Optimizer steps (also the length of the learning-rate schedule)."""
    batch_size: int = 32
    """Drill sequences per step."""
    optim: LearnerConfig = field(
        default_factory=lambda: sft_optim(lr=1e-3, warmup_steps=50, min_lr_frac=0.1)
    )
    """The learner's optimizer and schedule (the zoo's :func:`sft_optim`, peak lr 1e-3 after 50
    warm-up steps, cosine decay to 10%)."""
    eval_every: int = 250
    """Steps between held-out copy-accuracy evaluations."""
    eval_drills: int = 64
    """Held-out drills per evaluation (:func:`copy_accuracy`)."""
    seed: int = 0
    """Seeds the init and the drill stream."""


def _item(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:  # a key like the lookup-chain's
        return rng.choice(LETTERS) + f"{rng.randrange(100):02d}"
    if kind == 1:  # a number
        return str(rng.randrange(10 ** rng.randint(1, 5)))
    if kind == 2:  # a short lowercase word
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
    if kind == 3:  # a quoted word
        q = rng.choice("'\"")
        return q + "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))) + q
    return rng.choice(LETTERS) + "".join(
        rng.choice(LETTERS + "_") for _ in range(rng.randint(1, 6))
    )


def drill_text(rng: random.Random, max_items: int = 6) -> tuple[str, str, str]:
    """``(role, source, target)``: a message holding some items and an answer repeating them."""
    items = [_item(rng) for _ in range(rng.randint(1, max_items))]
    seps = [" ", ", ", ",", "\n", " | "]
    source_sep = rng.choice(seps)
    source = source_sep.join(items)
    if rng.random() < 0.5:  # items inside prose, or after a header line as in a tool result
        source = rng.choice(["value\n", "Result: ", "The items are ", "id\n", "Start at "]) + source
    target_items = list(items)
    if rng.random() < 0.3:
        target_items.reverse()
    target = rng.choice(seps).join(target_items)
    wrap = rng.randrange(4)
    if wrap == 1:
        target = f'{{"value": "{target}"}}'
    elif wrap == 2:
        target = f"f({target})"
    elif wrap == 3:
        target = f"= {target}"
    return rng.choice(["tool", "user"]), source, target


def drill(tokenizer: Any, rng: random.Random) -> tuple[list[int], list[int]]:
    """One drill as ``(tokens, mask)``; the mask is 1 on the answer and its end-of-turn token."""
    role, source, target = drill_text(rng)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head = enc(f"<|im_start|>{role}\n{source}<|im_end|>\n<|im_start|>assistant\n")
    tail = enc(target + "<|im_end|>")
    return head + tail, [0] * len(head) + [1] * len(tail)


@torch.no_grad()
def copy_accuracy(model: Any, tokenizer: Any, n: int, seed: int, skip: int = 4) -> float:
    """Teacher-forced argmax accuracy on held-out drill answers (their own seed stream).

    A drill's layout (wrapper, separator, order) is a random choice made in its first tokens,
    which no model can guess; the first ``skip`` answer tokens are therefore not scored. After
    them every token is determined by the source message, so a model that copies scores ~1.
    """
    rng = random.Random(10_000_000 + seed)
    model.eval()
    seqs = [drill(tokenizer, rng) for _ in range(n)]
    episodes = [as_episode(t, m, "drill") for t, m in seqs]
    tokens, mask, attn = pad_segments([ep.segments[0] for ep in episodes], tokenizer.pad_token_id)
    for b, (_, m) in enumerate(seqs):
        start = m.index(1)
        mask[b, start : start + skip] = 0
    pred = model(input_ids=tokens, attention_mask=attn).logits[:, :-1].argmax(-1)
    scored = mask[:, 1:]
    model.train()
    return float(((pred == tokens[:, 1:]).float() * scored).sum() / scored.sum().float())


def pretrain(
    preset: str, recipe: PretrainRecipe, *, progress: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Train ``preset`` from its seeded init on drills; returns ``(model, report)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    tokenizer = load_tokenizer()
    model = build_model(preset, seed=recipe.seed)
    learner = Learner(model, recipe.optim, tokenizer.pad_token_id, total_steps=recipe.steps)
    rng = random.Random(recipe.seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    evals: list[dict[str, float]] = []

    model.train()
    columns = [
        TextColumn(f"[bold]{preset}-base: pretrain"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]  # fmt: skip
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("pretrain", total=recipe.steps, info="")
        for step in range(recipe.steps):
            drills = [as_episode(*drill(tokenizer, rng), "drill") for _ in range(recipe.batch_size)]
            losses.append(learner.step_sft(drills)["learner/loss"])
            info = f"loss {sum(losses[-20:]) / len(losses[-20:]):.4f}"
            if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
                rate = copy_accuracy(model, tokenizer, recipe.eval_drills, recipe.seed)
                evals.append(
                    {"step": step + 1, "copy_accuracy": rate, "seconds": time.perf_counter() - t0}
                )
                info += f" copy acc {rate:.1%}"
                print(f"{preset}-base step {step + 1}: {info} ({evals[-1]['seconds']:.0f}s)",
                      flush=True)  # fmt: skip
            bar.update(task, advance=1, info=info)
    model.eval()
    report = {
        "name": f"{preset}-base",
        "preset": preset,
        "recipe": asdict(recipe),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "loss_curve": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4)
            for i in range(0, len(losses), 50)
        ],
        "evals": evals,
        "copy_accuracy": evals[-1]["copy_accuracy"] if evals else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, report


def build_base(
    preset: str, path: Path, *, progress: bool = True, half: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Pretrain ``preset`` and save it (with ``zoo.json``) atomically to ``path``."""
    from agentopd.zoo.bootstrap import _save_atomically

    model, report = pretrain(preset, with_overrides(PretrainRecipe(), overrides), progress=progress)
    if half:
        model = model.half()
    _save_atomically(model, load_tokenizer(), report, Path(path))
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m agentopd.zoo.pretrain PRESET --out DIR [--steps N ...]``."""
    p = argparse.ArgumentParser(description="Pretrain a zoo base model on synthetic copy drills.")
    p.add_argument("preset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--half", action="store_true", help="save float16 weights (shipped form)")
    add_recipe_flags(p, PretrainRecipe, skip={"optim", "name", "epochs_per_batch"})
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = ("preset", "out", "threads", "half")
    overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    report = build_base(args.preset, args.out, half=args.half, **overrides)
    print(json.dumps({k: report[k] for k in ("name", "evals", "seconds", "final_loss")}, indent=2))


if __name__ == "__main__":
    main()
