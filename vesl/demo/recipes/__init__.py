"""Recipes that train vesl's tiny offline demo models on the synthetic scene world.

The results ship in ``vesl/demo/assets/`` and load through the same ``hf:`` / ``owlv2:`` code as hub
models, so the offline demo exercises the real labeling path rather than a special case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any


def git_commit() -> str:
    """The commit the recipe ran from, so a shipped checkpoint can be traced back to its code."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent, check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_seconds() -> float:
    """User+system CPU time of this process (wall time is misleading on a shared machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def write_recipe_record(out: Path, name: str, command: str, record: dict[str, Any]) -> None:
    """Write recipe.json and RECIPE.md beside the weights: what produced them and how to redo it."""
    record = {
        "recipe": name,
        "command": command,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "created_unix": int(time.time()),
        **record,
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    lines = [
        f"# {name}",
        "",
        "Trained by vesl on the synthetic scene world (`vesl.demo.synth`); no external data or weights.",
        "",
        "Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        "| key | value |",
        "| --- | --- |",
    ]
    for k in sorted(record):
        if k in ("command",):
            continue
        v = record[k]
        lines.append(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |")
    (out / "RECIPE.md").write_text("\n".join(lines) + "\n")


def save_checkpoint(model, processor, out: Path) -> None:
    """Weights, config and processor in the ``from_pretrained`` layout the product loads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def lr_at(step: int, recipe: Any) -> float:
    """Linear warmup over ``recipe.warmup`` steps, then a cosine down to 5% of ``recipe.lr`` at the last step."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def save_step(model, processor, out: Path, recipe: Any, step: int) -> None:
    """Every ``recipe.save_every`` steps an intermediate checkpoint ``OUT.stepN``, so a long run can be inspected."""
    if recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < recipe.steps:
        save_checkpoint(model, processor, out.with_name(out.name + f".step{step + 1}"))


def finish(model, processor, out: Path, *, params: int, final_loss_ema: Any, t0: float, c0: float) -> dict:
    """Save the final checkpoint (in eval mode) and return the run's stats for the record."""
    model.eval()
    save_checkpoint(model, processor, out)
    return {
        "params": params,
        "final_loss_ema": final_loss_ema,
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(cpu_seconds() - c0, 1),
    }


def recipe_main(
    argv: list[str] | None,
    *,
    doc: str,
    recipe_cls: type,
    flags: list[str],
    default_out: Path,
    module: str,
    title: str,
    train: Callable[..., dict],
    data: Callable[[Any], dict],
) -> None:
    """The command line both recipes share: each name in ``flags`` is a recipe field and a ``--flag``.

    Trains, then writes the record with the exact command that redoes the run (flags in ``flags`` order).
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=default_out)
    for name in flags:
        default = getattr(recipe_cls, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--init", type=Path, default=None, help="continue from this checkpoint (a recipe output)")
    args = p.parse_args(argv)
    recipe = recipe_cls(**{name: getattr(args, name) for name in flags})
    stats = train(recipe, args.out, init=args.init)
    words = ["--out", str(args.out)]
    for name in flags:
        words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    command = f"python -m {module} " + shlex.join(words + (["--init", str(args.init)] if args.init else []))
    record = {"config": asdict(recipe), "data": data(recipe), **stats}
    if args.init:
        prev = args.init / "recipe.json"
        record["init_recipe"] = json.loads(prev.read_text()) if prev.is_file() else str(args.init)
    write_recipe_record(args.out, title, command, record)
    print(f"saved to {args.out}: {stats}", file=sys.stderr)
