"""`glmgym agent datasets`: what can be trained on without a download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from glmgym.agents.data import d4rl_dataset_dir, embedded_datasets, episode_bounds, load_minari
from glmgym.errors import GlmgymError, import_extra

__all__ = ["format_catalog", "list_datasets"]


def _hdf5_summary(path: Path) -> dict[str, Any]:
    """Episode and return statistics from rewards/terminals/timeouts only (fast on big files)."""
    h5py = import_extra("h5py", "agents")

    with h5py.File(path, "r") as f:
        rewards = f["rewards"][()].astype(np.float64).reshape(-1)
        starts, _ = episode_bounds(f["terminals"][()].reshape(-1), f["timeouts"][()].reshape(-1))
        env_id = f["metadata"].attrs.get("env_id") if "metadata" in f else None
    returns = np.add.reduceat(rewards, starts) if len(rewards) else np.zeros(1)
    return {"env_id": env_id.decode() if isinstance(env_id, bytes) else env_id,
            "episodes": len(starts), "transitions": len(rewards),
            "return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "return_min": float(returns.min()), "return_max": float(returns.max())}


def list_datasets() -> list[dict[str, Any]]:
    """Embedded datasets, D4RL files in the cache dir and local Minari datasets, with statistics."""
    rows: list[dict[str, Any]] = []
    for name, path in embedded_datasets().items():
        rows.append({"spec": f"embedded:{name}", "source": "embedded", **_hdf5_summary(path)})
    d4rl_dir = d4rl_dataset_dir()
    for path in sorted(d4rl_dir.glob("*.hdf5")) if d4rl_dir.is_dir() else []:
        try:
            rows.append({"spec": f"d4rl:{path}", "source": "d4rl", **_hdf5_summary(path)})
        except (OSError, KeyError) as exc:
            rows.append({"spec": f"d4rl:{path}", "source": "d4rl", "error": str(exc)})
    try:
        import minari
    except ImportError:
        minari = None
    if minari is not None:
        for dataset_id in sorted(minari.list_local_datasets()):
            try:
                rows.append({"spec": f"minari:{dataset_id}", "source": "minari",
                             **{k: v for k, v in load_minari(dataset_id).summary().items() if k != "name"}})
            except GlmgymError as exc:
                rows.append({"spec": f"minari:{dataset_id}", "source": "minari", "error": str(exc)})
    return rows


def format_catalog(rows: list[dict[str, Any]]) -> str:
    """A readable table of `list_datasets()`."""
    if not rows:
        return "no datasets found"
    width = max(len(r["spec"]) for r in rows)
    lines = [f"{'dataset':<{width}} {'env':<14} {'episodes':>8} {'transitions':>11} "
             f"{'return mean':>11} {'std':>8} {'min':>8} {'max':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['spec']:<{width}} unreadable: {r['error']}")
            continue
        lines.append(f"{r['spec']:<{width}} {r.get('env_id') or '?':<14} {r['episodes']:>8d} "
                     f"{r['transitions']:>11d} {r['return_mean']:>11.1f} {r['return_std']:>8.1f} "
                     f"{r['return_min']:>8.1f} {r['return_max']:>8.1f}")
    lines.append(f"(D4RL cache: {d4rl_dataset_dir()}; Minari store: "
                 f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')})")
    return "\n".join(lines)
