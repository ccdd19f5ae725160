"""The builder: one typed config -> student, tokenizer, renderer, engine, teacher, learner,
curriculum. ``train``, ``eval``, ``diagnose``, ``collect`` and the zoo all build through here.

Everything that can fail because of a bad value (a model that does not load, a tokenizer
mismatch, ``teacher_cfg.topk`` above the vocabulary, env kwargs the env rejects) fails here,
before the caller creates a run directory. :func:`choices` says what was actually picked (the
sandbox backend, engine, teacher backend, package versions, git commit) for the run to record.

Under ``torchrun`` (:func:`build_train` with a ``world`` of several ranks) every rank starts
from rank 0's weights; with ``distributed.strategy=fsdp2`` the student is sharded over the ranks
(:func:`agentopd.fsdp.shard`), the learner holds this rank's shards, and the rollout engine
samples from a full copy of its own (:attr:`Parts.replica`, :meth:`Parts.sync_engine`).

Example::

    cfg = to_object(compose("train", ["env=lookup-chain", "steps=2"]))
    parts = build_train(cfg)
    episodes = run_episodes(jobs, parts.engine, parts.renderer, rollout_config(cfg))
    parts.teacher.score(episodes)
    parts.learner.step(episodes)
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from agentopd import distributed, fsdp, lora, mixture, registry, zoo
from agentopd.config import ConfigError, TrainConfig, resolve_model, to_dataclass
from agentopd.curriculum import METHODS, Curriculum
from agentopd.engines import Engine, EngineConfig
from agentopd.learner import Learner
from agentopd.logprobs import OutputHead, output_head
from agentopd.losses import full_vocab_beta
from agentopd.renderer import MismatchPolicy, Renderer
from agentopd.rollout import RolloutConfig
from agentopd.teachers import (
    Teacher,
    TeacherConfig,
    TokenizerMismatchError,
    check_tokenizers,
    routing,
)
from agentopd.teachers.routing import RoutingTeacher
from agentopd.types import Episode


@dataclass
class Parts:
    """What a command runs with."""

    device: torch.device
    student: Any
    tokenizer: Any
    renderer: Renderer
    engine: Engine
    teacher: Teacher | None = None
    learner: Learner | None = None
    curriculum: Curriculum | None = None
    choices: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    demos: list[Any] | None = None
    """Successful episodes of ``cold_start.data``, when that is set."""
    replica: Any = None
    """Under ``distributed.strategy=fsdp2``: the full, plain copy of the student the rollout
    engine samples from and checkpoints are written from (see :meth:`sync_engine`)."""

    def full_model(self) -> Any:
        """The student with every weight in one place: the engine's replica under ``fsdp2``
        (synced after every update), else the student itself."""
        return self.replica if self.replica is not None else self.student

    def save_model(self, directory: Path) -> None:
        """Write the student (its LoRA adapter too) and tokenizer in ``save_pretrained`` format."""
        lora.save_pretrained(self.full_model(), self.tokenizer, directory)

    def load_model(self, checkpoint: Path) -> None:
        """Load the student's weights from a checkpoint directory (its ``model/``, or with LoRA
        its ``adapter/``), into the shards under ``fsdp2`` (then call :meth:`sync_engine`)."""
        from transformers import AutoModelForCausalLM

        if lora.is_lora(self.student):
            lora.load_adapter(self.student, checkpoint / "adapter")
        else:
            loaded = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
            fsdp.load_full_state_dict(self.student, loaded.state_dict())

    def sync_engine(self) -> None:
        """Give the rollout engine the learner's current weights (after every update and a
        resume): pushed to an engine with weights of its own (vLLM), a no-op for an ``hf``
        engine that shares the student's parameters. Under ``fsdp2`` the full weights are
        gathered (a collective every rank calls here) into the engine's replica."""
        if self.replica is not None:
            self.engine.load_weights(fsdp.full_state_dict(self.student))
        else:
            self.engine.load_weights(lora.engine_weights(self.student))


def resolve_device(name: str, cpu_threads: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cpu_threads > 0`` sets torch's CPU threads
    (tiny models run fastest on one thread: more threads mostly add synchronisation)."""
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def student_name(cfg: Any) -> str:
    return "tiny-base" if cfg.student == "auto" else cfg.student


def teacher_name(cfg: Any, env: str | None = None) -> str:
    """The teacher of ``env`` (default: the run's env; in a mixture, each member's own
    through :func:`teacher_routes`)."""
    env = env or cfg.env
    if getattr(cfg, "teachers", None) or mixture.is_mixture(cfg.env):
        return teacher_routes(cfg)[env]
    return routing.auto_teacher(env) if cfg.teacher == routing.AUTO else cfg.teacher


def teacher_routes(cfg: Any) -> dict[str, str]:
    """Env -> teacher name for every env of the run (:func:`agentopd.teachers.routing.routes`)."""
    envs = [m.env for m in mixture.members(cfg.env, cfg.env_kwargs)]
    return routing.routes(envs, getattr(cfg, "teachers", None) or {}, cfg.teacher)


def rollout_config(cfg: Any, temperature: float | None = None) -> RolloutConfig:
    """The ``rollout`` node as a :class:`RolloutConfig` (optionally at another temperature)."""
    r = cfg.rollout
    r = to_dataclass(r, RolloutConfig) if isinstance(r, DictConfig) else r
    return r if temperature is None else dataclasses.replace(r, temperature=temperature)


def load_model(name: str, key: str, seed: int = 0) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: a zoo preset is freshly initialised with ``seed``."""
    if name in zoo.PRESETS:
        return zoo.build_model(name, seed=seed), zoo.load_tokenizer()
    try:
        return zoo.load(resolve_model(name, key), progress=True)
    except zoo.FetchError as e:
        raise ConfigError(f"{key}={name}: {e}") from None
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}={name} could not be loaded: {type(e).__name__}: {e}") from None


def check_env(cfg: Any) -> None:
    """Build every env of the run once with its kwargs (each member of a mixture), so a bad
    kwarg fails now with the env's message."""
    for member in mixture.members(cfg.env, cfg.env_kwargs):
        key = (
            f"env_kwargs.envs.{member.env}.env_kwargs"
            if mixture.is_mixture(cfg.env)
            else "env_kwargs"
        )
        try:
            env = registry.make(member.env, **member.env_kwargs)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{key} for env={member.env} rejected: {e}") from None
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing a probe env must not fail the build
            pass


def make_engine(
    name: str, model: Any, renderer: Renderer, workdir: Path, config: Any = None
) -> Engine:
    """Build the registered engine ``name`` around ``model`` with the ``engine_cfg`` node."""
    factory = registry.engines.spec(name).load()
    if isinstance(config, DictConfig):
        config = OmegaConf.to_object(config)
    try:
        return factory(model, renderer=renderer, workdir=workdir, config=config or EngineConfig())
    except ImportError as e:
        raise ConfigError(f"engine={name} is not available: {e}") from None


def make_teacher(cfg: Any, tokenizer: Any, device: torch.device) -> Teacher:
    """The run's teacher: the backend ``cfg.teacher_backend`` for ``teacher_name(cfg)``, or,
    when envs route to different teachers (a mixture, ``teachers.*``), a
    :class:`~agentopd.teachers.routing.RoutingTeacher` over one teacher per distinct name.
    With ``teacher_backend=hf``, teachers that are LoRA adapters over one base share that base
    (:mod:`agentopd.teachers.adapters`)."""
    table = teacher_routes(cfg)
    names = list(dict.fromkeys(table.values()))
    if len(names) == 1:
        return _make_one_teacher(cfg, names[0], tokenizer, device)
    t_cfg = cfg.teacher_cfg
    t_cfg = t_cfg if isinstance(t_cfg, TeacherConfig) else to_dataclass(t_cfg, TeacherConfig)
    built: dict[str, Teacher] = {}
    for base, adapters in shared_bases(cfg, names).items():
        from agentopd.teachers.adapters import build_experts

        try:
            built.update(
                build_experts(base, adapters, tokenizer=tokenizer, config=t_cfg, device=device)
            )
        except TokenizerMismatchError as e:
            raise ConfigError(f"teacher base {base}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"teachers over {base}: {e}") from None
    for name in names:
        if name not in built:
            built[name] = _make_one_teacher(cfg, name, tokenizer, device)
    return RoutingTeacher({env: built[name] for env, name in table.items()}, t_cfg)


def shared_bases(cfg: Any, names: list[str]) -> dict[str, dict[str, Path]]:
    """Base model -> (teacher name -> adapter directory) for the teachers in ``names`` that
    are LoRA adapters sharing a base with another of them (``teacher_backend=hf`` only: other
    backends load every teacher their own way)."""
    if cfg.teacher_backend != "hf":
        return {}
    groups: dict[str, dict[str, Path]] = {}
    for name in names:
        try:
            found = zoo.adapter_of(resolve_model(name, "teacher"))
        except ValueError as e:
            raise ConfigError(f"teacher {name}: {e}") from None
        if found is not None:
            groups.setdefault(found[0], {})[name] = found[1]
    return {base: group for base, group in groups.items() if len(group) > 1}


def check_teachers(cfg: Any) -> None:
    """Before any model loads: every env of the run has a teacher, every teacher's tokenizer
    is the student's, and every LoRA adapter teacher fits its base model (shapes read from the
    adapter file against the base's architecture, built on the meta device).

    Raises:
        ConfigError: The first env without a teacher, teacher with another tokenizer, or
            adapter that does not fit its base, with the reason.
    """
    table = teacher_routes(cfg)
    try:
        student_tok = zoo.tokenizer_of(resolve_model(student_name(cfg), "student"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"student={student_name(cfg)}: its tokenizer could not be read: {type(e).__name__}: {e}"
        ) from None
    envs_of: dict[str, list[str]] = {}
    for env, name in table.items():
        envs_of.setdefault(name, []).append(env)
    for name, envs in envs_of.items():
        where = f"teacher {name} (for {', '.join(envs)})"
        path = resolve_model(name, "teacher")
        try:
            check_tokenizers(student_tok, zoo.tokenizer_of(path))
            adapter = zoo.adapter_of(path)
        except TokenizerMismatchError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where} could not be read: {type(e).__name__}: {e}") from None
        if adapter is not None:
            base, adapter_dir = adapter
            try:
                lora.check_fits(zoo.meta_model(resolve_model(base, "teacher base")), adapter_dir)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None


def _make_one_teacher(cfg: Any, name: str, tokenizer: Any, device: torch.device) -> Teacher:
    """Build the teacher backend ``cfg.teacher_backend`` for the model ``name``."""
    from agentopd.teachers import BackendUnavailableError

    if name not in zoo.PRESETS:
        resolve_model(name, "teacher")
    factory = registry.teachers.spec(cfg.teacher_backend).load()
    t_cfg = cfg.teacher_cfg
    t_cfg = t_cfg if isinstance(t_cfg, TeacherConfig) else to_dataclass(t_cfg, TeacherConfig)
    vocab = len(tokenizer)
    if t_cfg.topk > vocab:  # checked before the (possibly long) load
        raise ConfigError(
            f"bad value {t_cfg.topk} for 'teacher_cfg.topk': expected at most the vocabulary "
            f"size {vocab} (nearest valid: {vocab})"
        )
    try:
        teacher = factory(name, tokenizer=tokenizer, config=t_cfg, device=device)
    except ConfigError:
        raise
    except TokenizerMismatchError as e:
        raise ConfigError(f"teacher={name}: {e}") from None
    except BackendUnavailableError as e:
        raise ConfigError(str(e)) from None
    except zoo.FetchError as e:
        raise ConfigError(f"teacher={name}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher={name} could not be loaded: {type(e).__name__}: {e}") from None
    return teacher


def full_vocab_head(
    cfg: Any, student: Any, teacher: Teacher, loss: str | None = None
) -> OutputHead | None:
    """The teacher's output head when it is in process (an ``hf`` teacher), which is then asked
    to keep its hidden states at the scored tokens: every step reports the exact reverse KL
    (``diag/true_rkl``) and the full-vocabulary objectives can train. None for other backends.
    ``loss`` is the objective that trains (None: no training, as in ``agentopd diagnose``).

    Raises:
        ConfigError: A full-vocabulary ``loss`` (``rkl-full``, ``fkl-full``, ``jsd-full``) with
            a teacher that is not in process, or whose output layer's vocabulary differs from
            the student's.
    """
    from agentopd.teachers.hf import HFTeacher

    full = loss is not None and (
        full_vocab_beta(registry.losses.spec(loss).load(), cfg.loss_cfg) is not None
    )
    topk_losses = "rkl-sampled, rkl-topk, fkl-topk or jsd"
    if isinstance(teacher, RoutingTeacher):
        teacher = _one_model(teacher, full, loss)
    if not isinstance(teacher, HFTeacher):
        if full:
            raise ConfigError(
                f"bad value {loss!r} for 'loss': a full-vocabulary objective needs the "
                f"teacher's whole next-token distribution, which teacher_backend="
                f"{cfg.teacher_backend} ({type(teacher).__name__}) does not give; expected "
                f"teacher_backend=hf. Valid options: teacher_backend=hf, or loss={topk_losses}"
            )
        return None
    head = teacher.output_head()
    if full:
        vocab = output_head(student).vocab
        if vocab != head.vocab:
            raise ConfigError(
                f"bad value {loss!r} for 'loss': the student's output layer has {vocab} "
                f"rows and the teacher's {head.vocab}; a full-vocabulary objective compares the "
                "two distributions token by token, so they must be equal. Valid options: "
                f"loss={topk_losses} (they read the teacher's scores of the student's token ids)"
            )
    teacher.keep_hidden = True
    return head


def _one_model(teacher: RoutingTeacher, full: bool, loss: str | None) -> Any:
    """The one in-process teacher whose output head serves every env of a routed teacher
    (experts over one shared base: the adapters leave the output layer alone), else None.

    Raises:
        ConfigError: A full-vocabulary ``loss`` with teachers that are different models.
    """
    from agentopd.teachers.hf import HFTeacher

    teachers = list(teacher.teachers.values())
    models = {id(t.model) for t in teachers if isinstance(t, HFTeacher)}
    head_adapted = any(
        hasattr(t.model.get_output_embeddings(), "lora_A")
        for t in teachers
        if isinstance(t, HFTeacher)
    )  # an adapter on the output layer gives each expert a head of its own
    if len(models) == 1 and not head_adapted and all(isinstance(t, HFTeacher) for t in teachers):
        for t in teachers:
            t.keep_hidden = True  # type: ignore[attr-defined]  # every one is an HFTeacher
        return teachers[0]
    if full:
        raise ConfigError(
            f"bad value {loss!r} for 'loss': a full-vocabulary objective projects the teacher's "
            "hidden states with one output layer, and this run's envs route to different "
            "teacher models. Use LoRA experts over one base (teacher_backend=hf), or "
            "loss=rkl-sampled, rkl-topk, fkl-topk or jsd"
        )
    return None


def make_teacher_engine(
    cfg: Any,
    teacher: Teacher,
    renderer: Renderer,
    workdir: Path,
    device: torch.device,
    env: str | None = None,
) -> Engine:
    """A rollout engine (``cfg.engine``) that plays the teacher model of ``env`` (default: the
    run's env): demonstrations (``demo_source=teacher``), ``guided-opd``'s guide turns, the
    teacher's evaluation and its recovery rate. An in-process ``hf`` teacher lends its own
    model, so the teacher is in memory once (an expert over a shared base activates its adapter
    before each generation); other backends hold no local model, and it is loaded here."""
    from agentopd.teachers.adapters import ExpertEngine, ExpertTeacher
    from agentopd.teachers.hf import HFTeacher

    if isinstance(teacher, RoutingTeacher):
        teacher = teacher.teacher_for(env or cfg.env)
    if isinstance(teacher, ExpertTeacher) and cfg.engine != "hf":
        raise ConfigError(
            f"engine={cfg.engine} cannot play a LoRA expert over a shared base (the teacher of "
            f"{env or cfg.env}): use engine=hf for the teacher's demonstrations and evaluation"
        )
    if isinstance(teacher, HFTeacher):
        model = teacher.model
    else:
        model, _ = load_model(teacher_name(cfg, env), "teacher")
        model.to(device).eval()
    engine = make_engine(cfg.engine, model, renderer, workdir, cfg.engine_cfg)
    return ExpertEngine(engine, teacher) if isinstance(teacher, ExpertTeacher) else engine


def check_fsdp2(cfg: Any) -> None:
    """Refuse what ``distributed.strategy=fsdp2`` does not do (before anything is built).

    Raises:
        ConfigError: LoRA adapters, or a rollout engine other than ``hf``.
    """
    if cfg.lora.r > 0:
        raise ConfigError(
            f"distributed.strategy=fsdp2 does not support LoRA (lora.r={cfg.lora.r}): the "
            "adapters are small, so replicate them with distributed.strategy=ddp"
        )
    if cfg.engine != "hf":
        raise ConfigError(
            f"distributed.strategy=fsdp2 runs with engine=hf only, got engine={cfg.engine}; "
            "use distributed.strategy=ddp"
        )


def build_train(
    cfg: TrainConfig, world: distributed.World | None = None, workdir: Path | None = None
) -> Parts:
    """Everything ``agentopd train`` runs with, on this torchrun rank of ``world`` (None: one
    process); raises :class:`ConfigError` on bad values."""
    world = world or distributed.World()
    sharded = world.size > 1 and cfg.distributed.strategy == "fsdp2"
    if sharded:
        check_fsdp2(cfg)
    device = resolve_device(cfg.device, cfg.cpu_threads)
    check_env(cfg)
    if cfg.teachers or mixture.is_mixture(cfg.env):
        check_teachers(cfg)  # every env has a teacher of the student's tokenizer; nothing loaded
    student, tokenizer = load_model(student_name(cfg), "student", cfg.seed)
    try:
        lora.apply(student, cfg.lora)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    student.to(device)
    # rollout.on_prefix_mismatch is one of the MismatchPolicy values (checked at compose time).
    policy = cast(MismatchPolicy, cfg.rollout.on_prefix_mismatch)
    renderer = Renderer(tokenizer, on_prefix_mismatch=policy)
    teacher = make_teacher(cfg, tokenizer, device)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="agentopd-engine-"))
    engine = make_engine(cfg.engine, student, renderer, workdir, cfg.engine_cfg)
    if world.size > 1:  # every rank starts from rank 0's weights
        distributed.broadcast_parameters(student)
        engine.load_weights(lora.engine_weights(student))
    replica = None
    if sharded:
        # The engine samples from a full copy of its own; the learner's optimizer holds this
        # rank's shard of the state.
        replica = copy.deepcopy(student).requires_grad_(False).eval()
        engine = make_engine(cfg.engine, replica, renderer, workdir, cfg.engine_cfg)
    learner = Learner(
        fsdp.shard(student) if sharded else student,
        cfg.optim,
        renderer.pad_id,
        loss=cfg.loss,
        loss_cfg=cfg.loss_cfg,
        topk=cfg.teacher_cfg.topk,
        total_steps=cfg.steps,
        teacher_head=full_vocab_head(cfg, student, teacher, cfg.loss),
    )
    curriculum = make_curriculum(cfg)
    parts = Parts(device, student, tokenizer, renderer, engine, teacher, learner, curriculum)
    parts.workdir, parts.replica = workdir, replica
    if cfg.cold_start.data and cfg.cold_start.steps > 0:
        parts.demos = load_demos(cfg.cold_start.data)
    parts.choices = choices(cfg)
    return parts


def make_curriculum(cfg: TrainConfig) -> Curriculum:
    """The registered curriculum ``cfg.curriculum`` with ``curriculum_kwargs``; on a mixture,
    one per member inside a :class:`~agentopd.mixture.MixtureCurriculum`.

    Raises:
        ConfigError: The registered object does not implement :class:`Curriculum`.
    """
    members = mixture.members(cfg.env, cfg.env_kwargs)
    if mixture.is_mixture(cfg.env):
        if cfg.curriculum == "guided-opd":
            raise ConfigError(
                "curriculum=guided-opd is not available on a mixture (env=mix): its guide turns "
                "come from one teacher engine; use uniform, horizon-sorted, tcod-f2b or tcod-b2f"
            )
        parts = [(m, _one_curriculum(cfg, m)) for m in members]
        return mixture.MixtureCurriculum(parts)
    return _one_curriculum(cfg, members[0])


def _one_curriculum(cfg: TrainConfig, member: mixture.Member) -> Curriculum:
    curriculum = registry.curricula.make(
        cfg.curriculum,
        env=member.env,
        env_kwargs=dict(member.env_kwargs),
        seed=cfg.seed,
        **dict(cfg.curriculum_kwargs),
    )
    if not isinstance(curriculum, Curriculum):
        missing = [m for m in METHODS if not callable(getattr(curriculum, m, None))]
        raise ConfigError(
            f"curriculum={cfg.curriculum} made a {type(curriculum).__name__}, which lacks "
            f"{', '.join(missing)} of agentopd.curriculum.Curriculum"
        )
    return curriculum


def load_demos(path: str, key: str = "cold_start.data") -> list[Episode]:
    """The successful episodes of a JSONL file written by ``agentopd collect``.

    Args:
        path: The file.
        key: The config key that named it, for error messages.

    Raises:
        ConfigError: The file is missing, a line is not an episode, or no episode is successful.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{key}={path}: no such file; expected a JSONL of episodes written by "
            "`agentopd collect`"
        )
    demos = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ep = Episode.from_json(line)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{key}={path}: line {n} is not an episode ({type(e).__name__}: {e})"
            ) from None
        if ep.success:
            demos.append(ep)
    if not demos:
        raise ConfigError(f"{key}={path} holds no successful episodes")
    return demos


def build_policy(cfg: Any, model_name: str) -> Parts:
    """A model and its rollout engine (``eval``, ``collect``, ``diagnose``'s student)."""
    device = resolve_device(cfg.device, cfg.cpu_threads)
    check_env(cfg)
    model, tokenizer = load_model(
        model_name, "model" if hasattr(cfg, "model") else "student", getattr(cfg, "seed", 0)
    )
    model.to(device)
    renderer = Renderer(tokenizer, on_prefix_mismatch=cfg.rollout.on_prefix_mismatch)
    workdir = Path(tempfile.mkdtemp(prefix="agentopd-engine-"))
    engine = make_engine(cfg.engine, model, renderer, workdir, cfg.engine_cfg)
    parts = Parts(device, model, tokenizer, renderer, engine, workdir=workdir)
    parts.choices = choices(cfg)
    return parts


def choices(cfg: Any) -> dict[str, Any]:
    """The choices a run records: sandbox backend actually used, engine, teacher backend,
    package versions and the project's git commit (when it is a git checkout)."""
    import transformers

    members = mixture.members(cfg.env, cfg.env_kwargs)
    out: dict[str, Any] = {
        "env": cfg.env,
        **(
            {"envs": {m.env: {"weight": m.weight, "env_kwargs": m.env_kwargs} for m in members}}
            if mixture.is_mixture(cfg.env)
            else {}
        ),
        **({"teacher_routing": _routing_choices(cfg)} if hasattr(cfg, "teachers") else {}),
        "engine": getattr(cfg, "engine", None),
        "teacher_backend": getattr(cfg, "teacher_backend", None),
        "sandbox_backend": _sandbox_backend(cfg),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": _version("vllm"),
        "agentopd": _version("agentopd"),
        "git_commit": _git_commit(),
        "device": str(resolve_device(cfg.device)),
    }
    return out


def _routing_choices(cfg: Any) -> dict[str, Any]:
    """Env -> its teacher, and how the teachers are held (``shared_base``: LoRA experts
    loaded side by side over one base model)."""
    table = teacher_routes(cfg)
    out: dict[str, Any] = {"by_env": table}
    names = list(dict.fromkeys(table.values()))
    shared = shared_bases(cfg, names) if len(names) > 1 else {}
    if shared:
        out["shared_base"] = {base: sorted(group) for base, group in shared.items()}
    return out


def _sandbox_backend(cfg: Any) -> str | None:
    found = [
        m.env_kwargs
        for m in mixture.members(cfg.env, cfg.env_kwargs)
        if m.env == "code-sandbox" or "backend" in m.env_kwargs
    ]
    if not found:
        return None
    kwargs = found[0]
    from agentopd.sandbox import resolve_backend

    try:
        return resolve_backend(str(kwargs.get("backend", "auto")))
    except Exception as e:  # noqa: BLE001 - recorded, and the env itself will raise
        return f"unavailable: {e}"


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
