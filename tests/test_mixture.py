"""Env mixtures (``env=mix``), teacher routing (``teachers.<env>``) and LoRA experts over one
shared base: config, curriculum split, routed scoring, adapter scores and memory, bad input
refused before anything loads, and ``agentopd train`` on a three-env mixture end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import agentopd
from safetensors.torch import save_file

from agentopd import build, lora, mixture, zoo
from agentopd.config import ConfigError, compose, to_object
from agentopd.lora import LoraConfig
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.teachers import TeacherConfig
from agentopd.teachers.adapters import ExpertTeacher, build_experts
from agentopd.teachers.hf import build as build_hf
from agentopd.teachers.routing import RoutingTeacher, routes
from agentopd.types import Episode, TeacherScores

ENVS = ("lookup-chain", "sql", "code-sandbox")
MIX3 = "env_kwargs.envs={lookup-chain: 1, sql: 1, code-sandbox: 1}"
SCORE_ATOL = 1e-4
"""Merged ``(W + s B A) x`` against unmerged ``W x + s B A x``, float32: rounding only."""


def make_adapter(
    path: Path,
    seed: int,
    *,
    preset: str = "tiny-teacher",
    base: str = "tiny-teacher-base",
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A random LoRA adapter (r=4, non-zero B so it changes the model) on ``preset``'s shapes,
    saved in peft's format with ``base`` as its base model."""
    model = zoo.build_model(preset)
    lora.apply(model, LoraConfig(r=4, alpha=8, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    model._agentopd_lora_config.save_pretrained(str(path))
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = base
    (path / "adapter_config.json").write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {env: make_adapter(root / env, seed=i) for i, env in enumerate(ENVS)}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(zoo.load_tokenizer())


def _train(*overrides: str):
    return to_object(compose("train", ["env=mix", MIX3, *overrides]))


# ---------------------------------------------------------------------------- mixture config
def test_apportion_splits_by_weight_and_rotates_ties():
    assert mixture.apportion(16, [1, 1, 1], step=0) == [6, 5, 5]
    assert mixture.apportion(16, [1, 1, 1], step=1) == [5, 6, 5]
    assert mixture.apportion(8, [3, 1]) == [6, 2]
    # fewer episodes than envs: every env gets its turn over steps
    seen = [mixture.apportion(1, [1, 1, 1], step=s) for s in range(3)]
    assert [sum(col) for col in zip(*seen, strict=True)] == [1, 1, 1]


def test_members_take_weights_kwargs_and_group_defaults():
    cfg = to_object(
        compose(
            "train",
            [
                "env=mix",
                "env_kwargs.envs={lookup-chain: {weight: 2, env_kwargs: {max_hops: 2}}, sql: 1}",
            ],
        )
    )
    got = mixture.members(cfg.env, cfg.env_kwargs)
    assert [(m.env, m.weight) for m in got] == [("lookup-chain", 2.0), ("sql", 1.0)]
    # min_hops comes from configs/env/lookup-chain.yaml, max_hops from the member
    assert got[0].env_kwargs == {"min_hops": 1, "max_hops": 2}
    assert mixture.members("sql", {"a": 1}) == [mixture.Member("sql", 1.0, {"a": 1})]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["env=mix"], "env=mix needs its envs and weights"),
        (["env=mix", "env_kwargs.envs={lookup-chian: 1}"], "Did you mean 'lookup-chain'?"),
        (["env=mix", "env_kwargs.envs={sql: 0}"], "expected a positive number"),
        (["env=mix", "env_kwargs.envs={sql: {wieght: 2}}"], "Did you mean 'weight'?"),
        (
            ["env=mix", "env_kwargs.envs={sql: 1}", "env_kwargs.hops=1"],
            "takes only env_kwargs.envs",
        ),
        (["env=mix", MIX3, "teachers.sqll=tiny-teacher"], "Did you mean 'sql'?"),
        (
            ["env=mix", MIX3, "teachers.sql=tiny-teacher", "teachers.lookup-chain=tiny-teacher"],
            "env 'code-sandbox' has no teacher",
        ),
        (
            ["env=mix", MIX3, "teachers.sql=/no/such/model", "teacher=tiny-teacher"],
            "teachers.sql=/no/such/model",
        ),
    ],
)
def test_bad_mixtures_are_refused_at_compose_time(overrides, expected):
    with pytest.raises(ConfigError) as e:
        compose("train", overrides)
    assert expected in " ".join(str(e.value).split())


def test_a_mixture_is_for_train_only():
    with pytest.raises(ConfigError, match="is for `agentopd train`"):
        compose("eval", ["env=mix", MIX3])


def test_routes_use_the_default_and_auto_per_env():
    assert routes(list(ENVS), {}, "auto") == {e: f"tiny-teacher-{e}" for e in ENVS}
    table = routes(list(ENVS), {"sql": "x", "default": "y"}, "auto")
    assert table == {"lookup-chain": "y", "sql": "x", "code-sandbox": "y"}
    assert routes(list(ENVS), {"sql": "x"}, "z") == {
        "lookup-chain": "z",
        "sql": "x",
        "code-sandbox": "z",
    }


# ---------------------------------------------------------------------------- curriculum
def test_mixture_curriculum_splits_steps_per_env_and_keeps_state_per_env():
    cfg = _train("curriculum=tcod-f2b", "curriculum_kwargs.eta=1")
    curriculum = build.make_curriculum(cfg)
    assert isinstance(curriculum, mixture.MixtureCurriculum)
    seeds: dict[str, list[int]] = {e: [] for e in ENVS}
    for step in range(3):
        jobs = curriculum.jobs(step, 4)
        assert len(jobs) == 4 and {j.env for j in jobs} == set(ENVS)
        for j in jobs:
            seeds[j.env].append(j.seed)
            assert j.options["max_turns"] == min(1 + step, j.options["max_turns"])
    for env, got in seeds.items():
        assert len(got) == len(set(got)), f"{env} replayed a task: {got}"
    knobs = curriculum.describe(2)
    assert knobs["curriculum/lookup-chain/horizon"] == 3
    assert set(knobs) == {f"curriculum/{e}/horizon" for e in ENVS}
    state = curriculum.state_dict()
    assert set(state) == set(ENVS)
    again = build.make_curriculum(cfg)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_guided_opd_is_refused_on_a_mixture():
    with pytest.raises(ConfigError, match="guided-opd is not available on a mixture"):
        build.make_curriculum(_train("curriculum=guided-opd"))


# ---------------------------------------------------------------------------- routing
class _Recorder:
    config = TeacherConfig()

    def __init__(self, tag: float):
        self.tag, self.calls = tag, []

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        self.calls.append([e.env for e in episodes])
        out = [[TeacherScores(positions_M=[0], logprobs_M=[self.tag])] for _ in episodes]
        for e, s in zip(episodes, out, strict=True):
            e.teacher = s
        return out


def test_routing_teacher_scores_each_env_once_and_keeps_episode_order():
    a, b = _Recorder(1.0), _Recorder(2.0)
    teacher = RoutingTeacher({"lookup-chain": a, "sql": b, "code-sandbox": a}, TeacherConfig())
    envs = ["sql", "lookup-chain", "code-sandbox", "sql", "lookup-chain"]
    episodes = [Episode(env=e, task_id=str(i)) for i, e in enumerate(envs)]
    scores = teacher.score(episodes)
    assert [s[0].logprobs_M[0] for s in scores] == [2.0, 1.0, 1.0, 2.0, 1.0]
    assert a.calls == [["lookup-chain", "code-sandbox", "lookup-chain"]] and len(b.calls) == 1
    with pytest.raises(KeyError, match="no teacher routed for env 'gym:x'"):
        teacher.score([Episode(env="gym:x", task_id="0")])


# ---------------------------------------------------------------------------- LoRA experts
def _episodes(renderer: Renderer) -> list[Episode]:
    jobs = [
        EpisodeJob(env, seed=s, options={"split": "train"}, env_kwargs=k)
        for env, k in (
            ("lookup-chain", {"hops": 2}),
            ("sql", {}),
            ("code-sandbox", {"backend": "local"}),
        )
        for s in range(2)
    ]
    return expert_episodes(jobs, renderer)


def test_adapter_experts_score_like_each_merged_expert(adapters, renderer):
    """One base with three unmerged adapters, routed by env, against each expert loaded alone
    (merged, the zoo's path): the same scores to SCORE_ATOL, the same top-k ids."""
    tok, cfg = zoo.load_tokenizer(), TeacherConfig(topk=8)
    names = {env: str(path) for env, path in adapters.items()}
    experts = build_experts(
        "tiny-teacher-base",
        {names[e]: adapters[e] for e in ENVS},
        tokenizer=tok,
        config=cfg,
        device="cpu",
    )
    routed = RoutingTeacher({e: experts[names[e]] for e in ENVS}, cfg)
    episodes = _episodes(renderer)
    got = routed.score(episodes)
    for env in ENVS:
        single = build_hf(names[env], tokenizer=tok, config=cfg, device="cpu")
        mine = [i for i, e in enumerate(episodes) if e.env == env]
        want = single.score([episodes[i] for i in mine])
        for i, w in zip(mine, want, strict=True):
            for g_seg, w_seg in zip(got[i], w, strict=True):
                assert len(g_seg.positions_M) > 0
                assert np.array_equal(g_seg.positions_M, w_seg.positions_M)
                assert np.array_equal(g_seg.topk_ids_M_K, w_seg.topk_ids_M_K)
                for name in ("logprobs_M", "topk_logprobs_M_K", "entropy_M"):
                    a, b = torch.tensor(getattr(g_seg, name)), torch.tensor(getattr(w_seg, name))
                    assert torch.allclose(a, b, atol=SCORE_ATOL, rtol=0), (env, name)
    # the adapters matter: another expert scores the same episode differently
    other = experts[names["sql"]].score([episodes[0]])[0][0].logprobs_M
    assert np.abs(other - got[0][0].logprobs_M).max() > 1e-3


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def test_three_adapter_experts_hold_one_base(adapters):
    """Three experts in memory: one base plus three adapters, within 10% of one teacher."""
    tok = zoo.load_tokenizer()
    experts = build_experts(
        "tiny-teacher-base",
        {str(p): p for p in adapters.values()},
        tokenizer=tok,
        config=TeacherConfig(),
        device="cpu",
    )
    models = {id(t.model) for t in experts.values()}
    assert len(models) == 1 and all(isinstance(t, ExpertTeacher) for t in experts.values())
    shared = next(iter(experts.values())).model
    one, _ = zoo.load(str(adapters["sql"]))  # one expert, merged: an ordinary teacher
    ratio = _param_bytes(shared) / _param_bytes(one)
    assert 1.0 < ratio <= 1.10, ratio


def test_full_vocab_losses_need_one_teacher_model(adapters):
    tok, cfg = zoo.load_tokenizer(), TeacherConfig()
    student = zoo.build_model("tiny")
    experts = build_experts(
        "tiny-teacher-base",
        {str(p): p for p in adapters.values()},
        tokenizer=tok,
        config=cfg,
        device="cpu",
    )
    shared = RoutingTeacher({e: experts[str(adapters[e])] for e in ENVS}, cfg)
    train_cfg = _train("loss=rkl-full")
    assert build.full_vocab_head(train_cfg, student, shared, "rkl-full") is not None
    assert all(t.keep_hidden for t in experts.values())
    apart = RoutingTeacher(
        {e: build_hf(str(adapters[e]), tokenizer=tok, config=cfg, device="cpu") for e in ENVS},
        cfg,
    )
    assert build.full_vocab_head(train_cfg, student, apart, None) is None
    with pytest.raises(ConfigError, match="route to different teacher models"):
        build.full_vocab_head(train_cfg, student, apart, "rkl-full")


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the builder loads any model (the checks must come first)."""

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the teachers were checked")

    monkeypatch.setattr(build, "load_model", refuse)
    monkeypatch.setattr(zoo, "load", refuse)


def test_a_teacher_with_another_tokenizer_is_refused_before_loading(tmp_path, no_model_loads):
    other = tmp_path / "other-tokenizer"
    tok = zoo.load_tokenizer()
    tok.add_tokens(["<an-extra-token>"])
    other.mkdir()
    (other / "config.json").write_text(json.dumps(zoo.model_config("tiny").to_dict()))
    tok.save_pretrained(other)
    cfg = _train("student=tiny", f"teachers.sql={other}", "teachers.default=tiny-teacher")
    with pytest.raises(ConfigError) as e:
        build.build_train(cfg)
    msg = str(e.value)
    assert f"teacher {other} (for sql)" in msg and "tokenizers differ" in msg


def test_an_adapter_of_another_base_is_refused_before_loading(tmp_path, no_model_loads):
    # trained on tiny (hidden 128) but claims tiny-teacher-base (hidden 256)
    wrong = make_adapter(tmp_path / "wrong", seed=0, preset="tiny")
    cfg = _train("student=tiny", f"teachers.sql={wrong}", "teachers.default=tiny-teacher")
    with pytest.raises(ConfigError, match="does not fit the base model") as e:
        build.build_train(cfg)
    assert "(for sql)" in str(e.value)


def test_an_adapter_without_a_base_is_refused_at_compose_time(tmp_path):
    path = make_adapter(tmp_path / "nobase", seed=0)
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = None
    (path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="names no base model"):
        compose("train", ["env=mix", MIX3, f"teachers.sql={path}", "teacher=tiny-teacher"])


def test_choices_record_the_routing_and_the_shared_base(adapters):
    overrides = [f"teachers.{env}={path}" for env, path in adapters.items()]
    got = build.choices(_train(*overrides))
    assert got["env"] == "mix" and list(got["envs"]) == list(ENVS)
    assert got["teacher_routing"]["by_env"] == {e: str(p) for e, p in adapters.items()}
    assert got["teacher_routing"]["shared_base"] == {
        "tiny-teacher-base": sorted(str(p) for p in adapters.values())
    }


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_on_a_three_env_mixture_with_three_adapter_teachers(tmp_path, adapters):
    r = agentopd(
        "train",
        "env=mix",
        "env_kwargs.envs={lookup-chain: {weight: 1, env_kwargs: {hops: 1}}, sql: 1, "
        "code-sandbox: {weight: 1, env_kwargs: {backend: local}}}",
        *(f"teachers.{env}={path}" for env, path in adapters.items()),
        "student=tiny",
        "steps=2",
        "episodes_per_step=3",
        "cold_start.steps=1",
        "cold_start.episodes=3",
        "cold_start.batch_size=3",
        "eval.episodes=1",
        "rollout.max_new_tokens=12",
        f"runs_dir={tmp_path}",
        "run_name=mix",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "mix"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    assert [row["step"] for row in train] == [0, 1]
    for env in ENVS:
        assert f"rollout/{env}/success" in train[0]
        assert f"diag/{env}/sampled_kl" in train[0]
    evals = [row for row in rows if row["phase"] == "eval"]
    assert evals and all(f"eval/{env}/success" in evals[-1] for env in ENVS)
    teacher_eval = [row for row in rows if row["phase"] == "teacher_eval"]
    assert teacher_eval and all(f"eval/{env}/success" in teacher_eval[-1] for env in ENVS)
    choices = json.loads((run / "choices.json").read_text())
    assert set(choices["teacher_routing"]["shared_base"]["tiny-teacher-base"]) == {
        str(p) for p in adapters.values()
    }
    result = json.loads(r.stdout[r.stdout.rindex('{\n  "run_dir"') :])
    assert set(result["by_env"]) == set(ENVS)
    for numbers in result["by_env"].values():
        assert {"success_before", "success_after_cold_start", "success_after"} <= set(numbers)
    # a cold start on the mixture's expert demonstrations (split by weight) ran
    cold = [row for row in rows if row["phase"] == "cold_start"]
    assert len(cold) == 1
    from agentopd.replay.store import EpisodeStore

    stored = [e.env for _, e in EpisodeStore(run).iter_episodes()]
    assert sorted(stored) == sorted(ENVS * 2)
    from agentopd.replay.plot import mixture_envs, plot_runs, read_metrics

    assert mixture_envs([r for r in read_metrics(run) if r["phase"] == "eval"]) == sorted(ENVS)
    assert plot_runs([run], tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_mixture_run_resumes_with_each_envs_curriculum(tmp_path):
    args = [
        "env=mix",
        "env_kwargs.envs={lookup-chain: {weight: 2, env_kwargs: {hops: 1}}, sql: 1}",
        "student=tiny",
        "teacher=tiny-teacher",
        "curriculum=tcod-f2b",
        "curriculum_kwargs.eta=1",
        "episodes_per_step=3",
        "cold_start.steps=0",
        "eval.episodes=0",
        "rollout.max_new_tokens=8",
        "checkpoint_every=1",
        f"runs_dir={tmp_path}",
        "run_name=r",
    ]
    r = agentopd("train", *args, "steps=1", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = agentopd("train", *args, "steps=2", "resume=true", "resume_override=true", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    horizons = [
        (row["step"], row["curriculum/lookup-chain/horizon"], row["curriculum/sql/horizon"])
        for row in rows
        if row["phase"] == "train"
    ]
    assert horizons == [(0, 1, 1), (1, 2, 2)]
