"""Run folders and trainer state, shared by both trainers (`agents.train`, `chat.tuning.finetune`).

A run folder holds the run's options as JSON and its checkpoints, each with `trainer_state.json`
(step, world size, what a resume needs as JSON) and `trainer_state.pt` (optimizer, schedule,
RNG). The rules here are the same for both trainers: a new run never writes into a folder that
holds files; a resume may change only the options that leave the run's math alone; a checkpoint
resumes with as many processes as wrote it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from glmgym._io import read_json
from glmgym.devices import native_bf16
from glmgym.errors import GlmgymError

__all__ = [
    "TRAINER_STATE_JSON",
    "TRAINER_STATE_PT",
    "check_world_size",
    "new_run_dir",
    "resume_config",
    "resumed",
    "use_bf16",
]

TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_PT = "trainer_state.pt"


def new_run_dir(out: str | None, default_name: str, resuming: bool) -> Path:
    """The run folder: `out`, or runs/<default_name>-<time>.

    Raises:
        GlmgymError: a new run (not `resuming`) would write into a folder that holds files.
    """
    run_dir = Path(out) if out else Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not resuming and run_dir.exists() and any(run_dir.iterdir()):
        raise GlmgymError(f"{run_dir} already holds files; pick another --out or pass --resume {run_dir}")
    return run_dir


def resumed(cfg: Any, saved: dict[str, Any], changeable: tuple[str, ...]) -> Any:
    """`cfg` continuing a run whose options were `saved` (its JSON dump).

    Options left at their default keep the run's value; those named in `changeable` may take a new
    one; changing any other option would change the run's math and is refused.

    Raises:
        GlmgymError: an option outside `changeable` differs from the run's.
    """
    cls = type(cfg)
    defaults = cls()
    merged = dict(saved)
    for f in dataclasses.fields(cls):
        given = getattr(cfg, f.name)
        if given == getattr(defaults, f.name):
            continue  # not given: the run's value stays
        given = list(given) if isinstance(given, tuple) else given  # as JSON stored it
        if f.name in changeable:
            merged[f.name] = given
        elif given != saved.get(f.name):
            raise GlmgymError(f"cannot change --{f.name.replace('_', '-')} when resuming "
                              f"(the run used {saved.get(f.name)!r})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


def resume_config(cfg: Any, run_dir: Path, config_file: str, ckpt: Path | None,
                  changeable: tuple[str, ...], older: dict[str, Any] | None = None) -> Any:
    """`cfg` merged with the run's saved options (`run_dir/config_file`), checking first that the
    checkpoint `ckpt` has a readable trainer state; `out` becomes the run folder. `older` gives
    the value of each option a run saved before the option existed used (its then fixed
    behaviour, often not today's default).

    Raises:
        GlmgymError: no saved options, no checkpoint or trainer state, or a changed option.
    """
    saved_file = run_dir / config_file
    if not saved_file.is_file():
        raise GlmgymError(f"cannot resume {run_dir}: it has no {config_file}")
    if ckpt is None:
        raise GlmgymError(f"cannot resume {run_dir}: it has no checkpoint yet")
    if not (ckpt / TRAINER_STATE_JSON).is_file():
        raise GlmgymError(f"cannot resume from {ckpt}: its {TRAINER_STATE_JSON} is missing")
    read_json(ckpt / TRAINER_STATE_JSON)  # a broken one: say so before anything runs
    merged = resumed(cfg, {**(older or {}), **read_json(saved_file)}, (*changeable, "resume", "out"))
    return dataclasses.replace(merged, out=str(run_dir), resume=cfg.resume)


def check_world_size(ckpt: Path, world: int) -> dict[str, Any]:
    """The checkpoint's trainer state, once it is known to come from `world` processes.

    Raises:
        GlmgymError: another number of processes wrote it.
    """
    state = read_json(ckpt / TRAINER_STATE_JSON)
    if state.get("world_size", 1) != world:
        raise GlmgymError(f"{ckpt} was written by {state.get('world_size', 1)} processes; resume it "
                          f"with the same number (now {world})")
    return state


def use_bf16(precision: str, device) -> bool:
    """--precision as a choice: bf16, fp32, or auto (bf16 where the hardware has it natively)."""

    return precision == "bf16" or (precision == "auto" and native_bf16(device))
