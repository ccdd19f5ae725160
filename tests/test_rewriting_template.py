"""A chat template that rewrites history (Qwen3-style: earlier turns lose their ``<think>``
block), end to end past the rollout: with ``rollout.on_prefix_mismatch=new-segment`` each
fresh rendering is its own segment, the teacher scores every segment at exactly its mask-1
positions with the distribution it gives that segment's own tokens, and the learner trains on
all of them. With ``error`` (the default) ``agentopd train`` stops with exit 1 and names the key.
"""

from __future__ import annotations

import torch
from test_renderer_rollout import REWRITING_TEMPLATE, ScriptedEngine

from agentopd import make, zoo
from agentopd.learner import Learner, LearnerConfig
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.teachers import TeacherConfig
from agentopd.teachers.hf import HFTeacher


def _rewritten_episode():
    r = Renderer(
        zoo.load_tokenizer(), chat_template=REWRITING_TEMPLATE, on_prefix_mismatch="new-segment"
    )
    texts = ["<think>look it up</think>" + make("lookup-chain").call("lookup", key="zz")] * 3
    [ep] = run_episodes(
        [EpisodeJob("lookup-chain", 0, options={"max_turns": 3})], ScriptedEngine(r, texts), r
    )
    return ep, r


def test_new_segments_are_scored_per_segment_and_trained():
    ep, r = _rewritten_episode()
    assert len(ep.segments) == 3
    teacher, _ = zoo.load("tiny-teacher-lookup-chain")
    scorer = HFTeacher(teacher, r, TeacherConfig())
    scorer.score([ep])
    for seg, sc in zip(ep.segments, ep.teacher, strict=True):
        assert sc.positions_M.tolist() == [t for t, m in enumerate(seg.mask) if m] and len(sc)
        with torch.no_grad():  # row t: the teacher's distribution over token t + 1
            full = torch.log_softmax(teacher(torch.tensor([seg.tokens])).logits[0].float(), -1)
        want = [float(full[t - 1, seg.tokens[t]]) for t in sc.positions_M.tolist()]
        assert max(abs(a - b) for a, b in zip(sc.logprobs_M.tolist(), want, strict=True)) < 1e-4
    student, _ = zoo.load("tiny-base")
    before = [p.detach().clone() for p in student.parameters()]
    stats = Learner(student, LearnerConfig(name="sgd", lr=0.1), r.pad_id).step([ep])
    assert stats["learner/tokens"] == sum(sum(s.mask) for s in ep.segments)
    assert {"diag/kl_turn/0", "diag/kl_turn/2"} <= set(stats)  # turns across all 3 segments
    moved = max((p - b).abs().max() for p, b in zip(student.parameters(), before, strict=True))
    assert torch.isfinite(torch.tensor(stats["learner/loss"])) and moved > 0


def test_error_policy_stops_train_with_the_key_named(monkeypatch, tmp_path, capsys):
    from agentopd import cli, trainer

    def rewriting_step(self, *args, **kwargs):
        # The step's rollout as it runs with a rewriting template and the default policy.
        r = Renderer(zoo.load_tokenizer(), chat_template=REWRITING_TEMPLATE)
        texts = ["<think>hmm</think>" + make("lookup-chain").call("lookup", key="zz")] * 3
        run_episodes([EpisodeJob("lookup-chain", 0)], ScriptedEngine(r, texts), r)
        raise AssertionError("the rewriting template was not detected")

    monkeypatch.setattr(trainer.Trainer, "train_step", rewriting_step)
    rc = cli.main([
        "train", "env=lookup-chain", "cold_start.steps=0", "eval.episodes=0", "steps=1",
        "episodes_per_step=2", f"runs_dir={tmp_path}", "run_name=r",
    ])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and "rollout.on_prefix_mismatch=new-segment" in err and "Traceback" not in err
    assert (tmp_path / "r" / "config.yaml").is_file()  # the run dir stays for inspection
