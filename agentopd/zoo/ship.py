"""Copy a built base or teacher into the package as float16 weights (maintainers only).

``python -m agentopd.zoo.ship DIR NAME`` writes ``agentopd/zoo/assets/models/NAME/`` with
``config.json``, ``generation_config.json``, ``model.safetensors`` (float16) and the build's
``zoo.json``; the tokenizer is not copied (the shipped one is used). With ``--env`` it then
re-measures held-out greedy success and recovery rate of the float16 weights, loaded back as
float32, and stores them in ``zoo.json`` under ``shipped_eval``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from agentopd.zoo import SHIPPED, _from_pretrained


def ship(src: Path, name: str, env: str | None = None, episodes: int = 64) -> Path:
    model, tokenizer = _from_pretrained(Path(src))
    dst = SHIPPED / name
    tmp = SHIPPED / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp)
    report = json.loads((Path(src) / "zoo.json").read_text())
    report["name"] = name
    if env is not None:
        from agentopd.zoo.bootstrap import held_out_success

        back, _ = _from_pretrained(tmp)
        kwargs = report.get("recipe", {}).get("env_kwargs", {})
        report["shipped_eval"] = held_out_success(
            back, tokenizer, env, episodes, kwargs, recovery=True
        )
    (tmp / "zoo.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("name")
    p.add_argument("--env", default=None, help="re-evaluate on this env after the fp16 cast")
    p.add_argument("--episodes", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    dst = ship(a.src, a.name, a.env, a.episodes)
    report = json.loads((dst / "zoo.json").read_text())
    print(dst, json.dumps(report.get("shipped_eval", report.get("copy_accuracy"))))


if __name__ == "__main__":
    main()
