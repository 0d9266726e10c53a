"""glmgym's fine-tuning outputs in the tools users have: THUDM's official ChatGLM-6B code and PEFT.

On a small random ChatGLM-6B (the tiny preset, saved in THUDM's layout with the official
`*.py` files and `auto_map` beside it, as THUDM's folder has them), this script

1. fine-tunes a LoRA adapter and two P-Tuning v2 prefixes (with and without projection) with
   `glmgym chat finetune`, a couple of steps each;
2. has another Python, with the official stack (transformers 4.27 and PEFT 0.3.0, as the
   `ptuning/` scripts of that time), load each output the official way and compute the logits of
   a prompt: `PeftModel.from_pretrained` for the adapter, and `get_prompt` with the prefix encoder's
   weights loaded as `ptuning/main.py` does for the prefixes. That Python also writes a prefix of
   its own, THUDM's way (pre_seq_len in the config, only `transformer.prefix_encoder.*` saved);
3. compares those logits with glmgym's (`load(..., lora=...)` merged, `ptuning_checkpoint=...`),
   and glmgym's logits for THUDM's prefix with the official model's.

    python3 -m venv ../oldpeft && ../oldpeft/bin/pip install torch==2.13.0 transformers==4.27.1 \\
        peft==0.3.0 "accelerate<0.21" "setuptools<70" sentencepiece "numpy<2"
    python benchmarks/compat_official.py --official-dir DIR --python ../oldpeft/bin/python

`--official-dir` holds THUDM's `modeling_chatglm.py`, `configuration_chatglm.py`,
`quantization.py` and `tokenization_chatglm.py` (from the THUDM/chatglm-6b model repository);
they run only in the other Python, never in glmgym. Writes `benchmarks/results/compat_official.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFICIAL_FILES = ("modeling_chatglm.py", "configuration_chatglm.py", "quantization.py",
                  "tokenization_chatglm.py")
PROMPT = "hello world, what is a policy"

# run in the official stack's Python: argv[1] = work dir (holds base/, lora/, pt-*/, ids.json)
OFFICIAL_SIDE = r'''
import json, sys, torch
try:  # PEFT 0.21 reads torch.distributed.tensor without importing it
    import torch.distributed.tensor
except ImportError:
    pass
from pathlib import Path
import transformers, peft
from transformers import AutoConfig, AutoModel
work = Path(sys.argv[1])
ids = torch.tensor([json.loads((work / "ids.json").read_text())])
out = {"transformers": transformers.__version__, "peft": peft.__version__}

def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()

def base(**overrides):
    config = AutoConfig.from_pretrained(work / "base", trust_remote_code=True, **overrides)
    return AutoModel.from_pretrained(work / "base", config=config, trust_remote_code=True).float()

torch.save(logits(base()), work / "official-base.pt")
merged = AutoModel.from_pretrained(work / "merged", trust_remote_code=True).float()
torch.save(logits(merged), work / "official-merged.pt")
from peft import PeftModel
model = PeftModel.from_pretrained(base(), str(work / "lora"))
torch.save(logits(model), work / "official-lora.pt")
for name in ("pt-plain", "pt-projection"):
    saved = json.loads((work / name / "config.json").read_text())
    model = base(pre_seq_len=saved["pre_seq_len"], prefix_projection=saved["prefix_projection"])
    state = torch.load(work / name / "pytorch_model.bin", map_location="cpu")
    prefix = {k[len("transformer.prefix_encoder."):]: v for k, v in state.items()
              if k.startswith("transformer.prefix_encoder.")}
    model.transformer.prefix_encoder.load_state_dict(prefix)
    torch.save(logits(model), work / f"official-{name}.pt")
# a prefix written THUDM's way: pre_seq_len in the config, only the prefix encoder's tensors
torch.manual_seed(1)
model = base(pre_seq_len=4, prefix_projection=True)
for p in model.transformer.prefix_encoder.parameters():
    torch.nn.init.normal_(p, std=0.5)
thudm = work / "pt-thudm"
thudm.mkdir(exist_ok=True)
prefix_state = {k: v for k, v in model.state_dict().items() if "prefix_encoder" in k}
torch.save(prefix_state, thudm / "pytorch_model.bin")
model.config.save_pretrained(thudm)
torch.save(logits(model), work / "official-pt-thudm.pt")
print(json.dumps(out))
'''


def _finetune(model_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    from glmgym.cli import main

    rc = main(["chat", "finetune", "--model", str(model_dir), "--train-file", str(data), "--out", str(out),
               "--steps", "2", "--save-every", "2", "--batch-size", "1", "--grad-accum", "1",
               "--learning-rate", "0.05",
               "--precision", "fp32", "--no-progress", "--prompt-column", "content",
               "--response-column", "summary", *extra])
    if rc != 0:
        raise SystemExit(f"finetune {extra} failed")
    return out / "checkpoint-2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-dir", required=True, help="THUDM's *.py files of chatglm-6b")
    p.add_argument("--python", required=True, help="a Python with transformers 4.27 and PEFT 0.3.0")
    p.add_argument("--out", default="benchmarks/results/compat_official.json")
    args = p.parse_args()

    import torch

    from glmgym._io import atomic_write_json
    from glmgym.chat.checkpoint import save_model
    from glmgym.chat.session import load

    work = Path(tempfile.mkdtemp(prefix="glmgym-compat-"))
    bot = load("random:tiny", dtype="float32")
    # the official code keeps its weights in fp16 whatever the checkpoint holds (params_dtype):
    # weights that fp16 represents exactly make both sides compute from the same numbers
    bot.model.half().float()
    base = save_model(bot.model, work / "base", tokenizer=bot.tokenizer)
    for name in OFFICIAL_FILES:
        shutil.copy2(Path(args.official_dir) / name, base / name)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                          "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    ids = bot.tokenizer.encode(PROMPT)
    (work / "ids.json").write_text(json.dumps(ids))
    data = work / "train.json"
    data.write_text("".join(json.dumps({"content": f"type {i} colour red", "summary": "a red dress"},
                                       ensure_ascii=False) + "\n" for i in range(4)))
    outputs = {
        "lora": _finetune(base, data, work / "run-lora", "--method", "lora"),
        "pt-plain": _finetune(base, data, work / "run-pt", "--method", "ptuning", "--pre-seq-len", "4"),
        "pt-projection": _finetune(base, data, work / "run-ptp", "--method", "ptuning", "--pre-seq-len", "4",
                                   "--prefix-projection"),
    }
    for name, ckpt in outputs.items():
        shutil.copytree(ckpt, work / name)
    written = sorted(f.name for f in (work / "lora").iterdir())
    from glmgym.chat.session import merge_lora_checkpoint

    merge_lora_checkpoint(base, work / "lora", work / "merged", torch.float32)  # the base's *.py come along
    proc = subprocess.run([args.python, "-c", OFFICIAL_SIDE, str(work)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the official side failed:\n{proc.stderr[-4000:]}")
    versions = json.loads(proc.stdout.strip().splitlines()[-1])

    def glmgym_logits(folder: Path = base, **kw) -> torch.Tensor:
        from glmgym.chat.generate import PromptBatch

        b = load(str(folder), dtype="float32", **kw)
        if folder != base:  # the official code rounds every weight to fp16 (see above)
            b.model.half().float()
        batch = PromptBatch.build([ids], b.tokenizer.pad_id)
        with torch.no_grad():  # every position's logits, under the prefix-LM mask
            return b.model(batch.input_ids, batch.position_ids, batch.attention_mask(b.model.prefix_len))[0]

    checks = {}
    for name, kw in (("base", {}), ("lora", {"lora": str(work / "lora")}),
                     ("pt-plain", {"ptuning_checkpoint": str(work / "pt-plain")}),
                     ("pt-projection", {"ptuning_checkpoint": str(work / "pt-projection")}),
                     ("pt-thudm", {"ptuning_checkpoint": str(work / "pt-thudm")}),
                     ("merged", {"folder": work / "merged"})):
        ours, theirs = glmgym_logits(**kw), torch.load(work / f"official-{name}.pt")
        base_logits = torch.load(work / "official-base.pt")
        checks[name] = {"max_abs_diff": float((ours - theirs).abs().max()),
                        "logit_scale": float(theirs.abs().max()),
                        "adapter_effect": float((theirs - base_logits).abs().max())}
        print(f"{name}: max |glmgym - official| = {checks[name]['max_abs_diff']:.2e} (the adapter moves "
              f"the official logits by up to {checks[name]['adapter_effect']:.2e})", flush=True)
    atomic_write_json(Path(args.out), {
        "date": time.strftime("%Y-%m-%d"), "official_stack": versions, "python": sys.version.split()[0],
        "torch": torch.__version__, "model": "random:tiny (2 layers, hidden 128), float32",
        "prompt_tokens": len(ids), "lora_files_written": written, "checks": checks,
        "what": {"base": "the base model alone: glmgym against the official code",
                 "lora": "glmgym's LoRA adapter through PeftModel.from_pretrained on the official model",
                 "pt-plain": "glmgym's P-Tuning v2 prefix without projection, loaded as ptuning/main.py does",
                 "pt-projection": "the same with --prefix-projection",
                 "pt-thudm": "a prefix written by the official code, loaded by glmgym",
                 "merged": "glmgym chat merge-lora's folder opened by AutoModel.from_pretrained(dir, "
                           "trust_remote_code=True), against glmgym on the same folder"}})
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
