"""The Decision Transformer table: glmgym's DT vs d3rlpy's DT vs BC vs the data, per dataset.

The default is the paper's nine datasets: halfcheetah, hopper and walker2d at medium,
medium-replay and medium-expert, made by `glmgym agent collect` (Gymnasium v5, not D4RL's v2).
Each name is looked up as an embedded dataset first, then as `--data-dir/<Env>-v5/<name>.hdf5`,
where `glmgym agent collect --env <Env>-v5 --out <data-dir>/<Env>-v5` writes it. A missing
`<family>-medium-expert` is made from the family's medium and expert files, one after the
other, as `collect` makes it. A dataset that cannot be found is reported and skipped.

Every method trains for the same number of gradient steps (default 10k, with 1k warmup) on the
same HDF5 file, for each training seed; every policy is then scored over the same evaluation
episodes (seeds seed..seed+N-1). glmgym's DT and d3rlpy's DT are evaluated at three target
returns (the paper's pair for the env, moved onto the dataset's scale as `train` does, and the
dataset's best return); the table reports each
method at its best target (best mean over seeds). Normalized scores use each dataset's own
reference returns (random and expert policy, from its metadata). d3rlpy runs in a virtual
environment of its own (it pins gymnasium 1.0.0):

    python3 -m venv /tmp/d3rlpy && /tmp/d3rlpy/bin/pip install torch==2.13.0 d3rlpy h5py \\
        "gymnasium[mujoco]==1.0.0"
    python benchmarks/dt_quality.py --d3rlpy-python /tmp/d3rlpy/bin/python

Results are cached per (dataset, method, seed) in the output JSON as each run ends, so an
interrupted run resumes and the table can be filled over several sessions; a dataset's cached
runs are dropped when its file (sha256) or the settings change. d3rlpy's trained DTs are kept as
`--runs`/<dataset>-d3rlpy-dt-seed<N>.npz, which `dt_heldout.py --d3rlpy` evaluates on more
episodes without training them again. Seeds run in parallel processes
write separate output files (`--out`); `--merge PART.json ...` then folds their runs into `--out`
(same data and settings only) and summarizes, without training anything:

    python benchmarks/dt_quality.py --methods glmgym_dt --datasets hopper-medium --seeds 1 --out part1.json
    python benchmarks/dt_quality.py --merge part1.json part2.json --out benchmarks/results/dt_quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import cpu_kind, gpu_name  # beside this script (sys.path[0])
from glmgym._io import atomic_write_json
from glmgym.agents import Policy, TrainConfig, train
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.collect import _concat_files, write_d4rl_hdf5
from glmgym.agents.data import embedded_datasets, load_dataset
from glmgym.agents.envs import ENV_IDS, env_family, normalized_score, reference_scores
from glmgym.agents.evaluate import evaluate
from glmgym.agents.train import default_target_returns
from glmgym.errors import GlmgymError

FAMILIES = ("halfcheetah", "hopper", "walker2d")
LEVELS = ("medium", "medium-replay", "medium-expert")
METHODS = ("glmgym_dt", "d3rlpy_dt", "bc")
# Decision Transformer paper, Table 2 (D4RL v2 data, 100k steps): for orientation only, since
# these datasets are not D4RL's (other env version, other SAC runs, own references).
PAPER_DT = {
    "halfcheetah-medium": 42.6, "hopper-medium": 67.6, "walker2d-medium": 74.0,
    "halfcheetah-medium-replay": 36.6, "hopper-medium-replay": 82.7, "walker2d-medium-replay": 66.6,
    "halfcheetah-medium-expert": 86.8, "hopper-medium-expert": 107.6, "walker2d-medium-expert": 108.1,
}


def find_dataset(name: str, data_dir: Path, made_dir: Path) -> Path | None:
    """The HDF5 file of a dataset name (see the module docstring), or None."""
    embedded = embedded_datasets()
    if name in embedded:
        return embedded[name]
    if Path(name).is_file():
        return Path(name)
    family = env_family(name)
    if family not in ENV_IDS:
        return None
    path = data_dir / ENV_IDS[family] / f"{name}.hdf5"
    if path.is_file():
        return path
    if name.endswith("-medium-expert"):
        parts = [find_dataset(f"{family}-{lvl}", data_dir, made_dir) for lvl in ("medium", "expert")]
        if None in parts:
            return None
        made = made_dir / f"{name}.hdf5"
        if not made.is_file() or made.stat().st_mtime < max(p.stat().st_mtime for p in parts):
            meta = dict(load_dataset(f"d4rl:{parts[0]}").metadata)
            meta.update(level="medium-expert", policy="medium followed by expert",
                        made_from=[p.name for p in parts])
            arrays = _concat_files(parts)
            meta["transitions"] = len(arrays["rewards"])
            made.parent.mkdir(parents=True, exist_ok=True)
            write_d4rl_hdf5(made, arrays, meta)
        return made
    return None


def load_with_env(name: str, path: Path):
    """A found dataset (`find_dataset`), its evaluation env id and its reference scores."""
    ds = load_dataset(f"d4rl:{path}")
    env_id = ENV_IDS.get(env_family(name)) or ds.env_id
    return ds, env_id, reference_scores(env_id, ds.metadata)


def table_targets(env_id: str, ds) -> list[float]:
    """`train`'s default targets (the paper's, on the dataset's scale) and the best return in the data."""
    return [*default_target_returns(env_id, ds), float(np.round(ds.episode_returns().max()))]


def run_glmgym(path: Path, env_id: str, args, seed: int, targets, ref, run_dir: Path) -> dict:
    """Train (resuming an interrupted run from its last checkpoint) and evaluate one seed."""
    resume = None
    try:
        resume = str(latest_checkpoint(run_dir))
    except GlmgymError:  # no checkpoint yet: start over
        shutil.rmtree(run_dir, ignore_errors=True)
    done = resume is not None and json.loads((Path(resume) / "trainer_state.json").read_text())["step"]
    if done != args.steps:  # (a run that finished training but not its evaluation skips this)
        train(TrainConfig(dataset=f"d4rl:{path}", env=env_id, steps=args.steps, warmup_steps=args.warmup,
                          seed=seed, eval_episodes=0, save_every=min(1_000, args.steps), out=str(run_dir),
                          windows=args.windows, init=args.init, precision=args.precision,
                          progress=False, resume=resume))
    # training time from the log (each record: steps/s since the previous one), so that the
    # parts of a resumed run add up and checkpoint writes are left out
    records = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    steps = [(r["step"], r["steps_per_s"]) for r in records if "steps_per_s" in r]
    seconds = sum((s - prev) / rate for (prev, _), (s, rate) in zip([(0, 0.0), *steps], steps))
    policy = Policy.from_pretrained(run_dir)
    report = evaluate(policy, env_id, targets, episodes=args.episodes, seed=seed, ref=ref)
    return {"train_seconds": seconds, "resumed": resume is not None,
            "returns": {str(r["target_return"]): r["returns"] for r in report["results"]}}


def d3rlpy_weights(runs_root: Path, name: str, seed: int) -> Path:
    """Where d3rlpy's DT trained on dataset `name` with `seed` is kept (its folder made), for this
    table and `dt_heldout.py --d3rlpy` alike."""
    runs_root.mkdir(parents=True, exist_ok=True)
    return runs_root / f"{name}-d3rlpy-dt-seed{seed}.npz"


def run_d3rlpy(path: Path, env_id: str, args, algo: str, seed: int, targets,
               episode_seed: int | None = None, save_model: Path | None = None,
               load_model: Path | None = None) -> dict:
    """Train and evaluate one d3rlpy run in its own venv; episodes from `episode_seed` (default:
    `seed`, as glmgym's table); the trained DT's weights to `save_model` (an .npz) if given; or,
    with `load_model`, evaluate the weights kept there without training (train_seconds None)."""
    with tempfile.TemporaryDirectory() as cwd:  # d3rlpy writes d3rlpy_logs/ there
        proc = subprocess.run(
            [args.d3rlpy_python, str(Path(__file__).resolve().with_name("_d3rlpy_runner.py")),
             "--dataset", str(path.resolve()), "--algo", algo, "--env", env_id,
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(seed),
             "--episodes", str(args.episodes), "--targets", *map(str, targets),
             *(["--episode-seed", str(episode_seed)] if episode_seed is not None else []),
             *(["--save-model", str(Path(save_model).resolve())] if save_model is not None else []),
             *(["--load-model", str(Path(load_model).resolve())] if load_model is not None else [])],
            capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"d3rlpy {algo} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"train_seconds": result["train_seconds"],
            "returns": {(k if k == "none" else str(float(k))): v for k, v in result["returns"].items()},
            "versions": {"d3rlpy": result["d3rlpy"], "gymnasium": result["gymnasium"]}}


def summarize(entry: dict, ref, ds) -> None:
    """Per method: the best target's normalized score over seeds; and the dataset's own score."""
    runs = entry["runs"]
    for method in METHODS:
        seeds = sorted(int(k.split("/")[1]) for k in runs if k.startswith(f"{method}/"))
        if not seeds:
            entry.pop(method, None)
            continue
        per_target: dict[str, list[float]] = {}
        for s in seeds:
            for target, returns in runs[f"{method}/{s}"]["returns"].items():
                per_target.setdefault(target, []).append(float(np.mean(normalized_score(returns, ref))))
        best = max(per_target, key=lambda t: np.mean(per_target[t]))
        entry[method] = {
            "normalized_score_mean": float(np.mean(per_target[best])),
            "normalized_score_std": float(np.std(per_target[best])),
            "best_target_return": None if best == "none" else float(best),
            "by_target": {t: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                          for t, v in per_target.items()},
            "train_seconds": float(np.mean([runs[f"{method}/{s}"]["train_seconds"] for s in seeds])),
            "seeds": seeds,
        }
    ds_norm = normalized_score(ds.episode_returns(), ref)
    entry["dataset"] = {"normalized_score_mean": float(ds_norm.mean()),
                        "normalized_score_std": float(ds_norm.std()),
                        "return_mean": float(ds.episode_returns().mean())}


def average(datasets: dict) -> dict:
    """Mean normalized score and training time per method over the datasets every method has."""
    complete = [n for n, e in datasets.items() if all(m in e for m in (*METHODS, "dataset"))]
    out = {"datasets": complete}
    for m in (*METHODS, "dataset"):
        if complete:
            out[m] = float(np.mean([datasets[n][m]["normalized_score_mean"] for n in complete]))
    for m in METHODS:
        if complete:
            out[f"{m}_train_seconds"] = float(np.mean([datasets[n][m]["train_seconds"] for n in complete]))
    return out


def merge(result: dict, parts: list[Path], data_dir: Path, made_dir: Path) -> None:
    """Fold the runs of other output files into `result`, dataset by dataset, and summarize each
    dataset they touched once.

    A dataset's runs merge only when both files ran it with the same data and settings; a run
    `result` already holds is kept."""
    touched: set[str] = set()
    for part in parts:
        if not part.is_file():
            raise SystemExit(f"--merge: {part} does not exist")
        for name, other in json.loads(part.read_text()).get("datasets", {}).items():
            entry = result["datasets"].setdefault(name, {"config": other["config"], "runs": {}})
            if entry["config"] != other["config"]:
                raise SystemExit(f"--merge: {part} ran {name} with other data or settings than {name} "
                                 "in --out; nothing merged")
            for key, run in other.get("runs", {}).items():
                entry["runs"].setdefault(key, run)
            touched.add(name)
    for name in sorted(touched):
        path = find_dataset(name, data_dir, made_dir)
        if path is None:
            raise SystemExit(f"--merge: {name}'s data not found (needed for its mean score)")
        ds = load_dataset(f"d4rl:{path}")
        entry = result["datasets"][name]
        summarize(entry, reference_scores(entry["config"]["env_id"], ds.metadata), ds)


def table(result: dict) -> str:
    """The results as a Markdown table (normalized scores, mean ± std over seeds)."""
    rows = ["| dataset | glmgym DT | d3rlpy DT | BC | data mean | paper DT (D4RL) |",
            "|---|---:|---:|---:|---:|---:|"]

    def cell(e: dict, m: str) -> str:
        if m not in e:
            return "–"
        return f"{e[m]['normalized_score_mean']:.1f} ± {e[m]['normalized_score_std']:.1f}"

    for name, e in result["datasets"].items():
        rows.append(f"| {name} | {cell(e, 'glmgym_dt')} | {cell(e, 'd3rlpy_dt')} | {cell(e, 'bc')} "
                    f"| {e['dataset']['normalized_score_mean']:.1f} | {PAPER_DT.get(name, '–')} |")
    avg = result["average"]
    if avg["datasets"]:
        rows.append(f"| average of {len(avg['datasets'])} | {avg['glmgym_dt']:.1f} | {avg['d3rlpy_dt']:.1f} "
                    f"| {avg['bc']:.1f} | {avg['dataset']:.1f} | |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=[f"{f}-{lvl}" for f in FAMILIES for lvl in LEVELS],
                   help="dataset names (embedded, or found in --data-dir) or HDF5 paths")
    p.add_argument("--data-dir", default="datasets", help="collect's output root: <dir>/<Env>-v5/*.hdf5")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="glmgym DT and BC seeds")
    p.add_argument("--d3rlpy-seeds", type=int, nargs="+", default=[0, 1], help="d3rlpy DT seeds")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--windows", choices=("start", "end"), default="start",
                   help="glmgym DT's training windows (TrainConfig.windows)")
    p.add_argument("--init", choices=("paper", "gpt2"), default="gpt2",
                   help="glmgym DT's embedding and head init (TrainConfig.init); like --windows, the "
                        "default is the recipe of dt_quality.json's runs, not train's (paper)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="glmgym DT training precision (auto: bf16 autocast on a GPU with native bf16)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--d3rlpy-python", default=None, help="python of a venv with d3rlpy")
    p.add_argument("--runs", default="benchmarks/runs", help="where glmgym's runs go")
    p.add_argument("--out", default="benchmarks/results/dt_quality.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="PART",
                   help="fold these output files' runs into --out and summarize; trains nothing")
    args = p.parse_args()

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("datasets", {})
    runs_root = Path(args.runs)
    # run folders of each recipe (window cut, init), so that one never resumes another's checkpoints
    tag = ("" if args.windows == "start" else f"{args.windows}-") + (
        "" if args.init == "gpt2" else f"{args.init}-init-")

    def save() -> None:
        result["average"] = average(result["datasets"])
        atomic_write_json(out, result)

    if args.merge:
        merge(result, [Path(m) for m in args.merge], Path(args.data_dir), runs_root / "data")
        save()
        print(table(result))
        return

    missing = []
    for name in args.datasets:
        path = find_dataset(name, Path(args.data_dir), runs_root / "data")
        if path is None:
            missing.append(name)
            print(f"{name}: not found (embedded or {args.data_dir}/<Env>-v5/{name}.hdf5); skipped")
            continue
        ds, env_id, ref = load_with_env(name, path)
        targets = table_targets(env_id, ds)
        setting = {"dataset_file": path.name, "dataset_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                   "env_id": env_id, "steps": args.steps, "warmup": args.warmup,
                   "episodes": args.episodes, "targets": targets,
                   **({"windows": args.windows} if args.windows != "start" else {}),
                   **({"init": args.init} if args.init != "gpt2" else {}),
                   "reference_scores": {"min": ref.min, "max": ref.max, "source": ref.source}}
        entry = result["datasets"].get(name, {})
        if entry.get("config") != setting:
            if entry:  # only then: a first seed's interrupted run has no entry yet and resumes
                print(f"{name}: cached runs are for other data or settings; starting over")
                for stale in runs_root.glob(f"{name}-glmgym-dt-{tag}seed*"):  # nor resume their checkpoints
                    shutil.rmtree(stale)
            entry = {"config": setting, "runs": {}}
        result["datasets"][name] = entry
        runs = entry["runs"]
        # the cheap BC first and d3rlpy's DT (which cannot resume mid-run) last
        order = sorted(args.methods, key=("bc", "glmgym_dt", "d3rlpy_dt").index)
        todo = [(m, s) for m in order for s in (args.d3rlpy_seeds if m == "d3rlpy_dt" else args.seeds)
                if f"{m}/{s}" not in runs and (m == "glmgym_dt" or args.d3rlpy_python)]
        for method, seed in todo:  # each result cached at once
            print(f"{name}: {method} seed {seed}", flush=True)
            if method == "glmgym_dt":
                run_dir = runs_root / f"{name}-glmgym-dt-{tag}seed{seed}"
                r = run_glmgym(path, env_id, args, seed, targets, ref, run_dir)
            elif method == "d3rlpy_dt":
                # its weights are kept, so that `dt_heldout.py --d3rlpy` evaluates this run again
                # without training it again
                r = run_d3rlpy(path, env_id, args, "dt", seed, targets,
                               save_model=d3rlpy_weights(runs_root, name, seed))
            else:
                r = run_d3rlpy(path, env_id, args, "bc", seed, targets)
            gpu = gpu_name() if method == "glmgym_dt" else None  # d3rlpy's and BC's run on the CPU
            runs[f"{method}/{seed}"] = {**r, "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
                                        **({"gpu": gpu} if gpu else {})}
            summarize(entry, ref, ds)
            save()
        summarize(entry, ref, ds)
        save()
    result["missing"] = missing
    save()
    print(table(result))


if __name__ == "__main__":
    main()
