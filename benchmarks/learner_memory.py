"""RSS of one DeepSpeed learner rank (SmolLM2, bf16 mixed, 1 rank, gloo) after init and after 2 optimizer steps of 4
micro-batches of 2 x 88 tokens, for the settings given as JSON, e.g.
    .venv/bin/python benchmarks/learner_memory.py '{"stage": 0, "fused": true}'   (stage, zero, fused, bf16, load_dtype)
Prints one JSON line: GiB of VmRSS at start, after loading, after deepspeed.initialize, after the steps; VmHWM."""
import json, os, sys, time
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
torch.set_num_threads(2)

def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 2**20
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) / 2**20

extra = json.loads(sys.argv[1])
import deepspeed
from transformers import AutoModelForCausalLM
from rlhf_ray.models.loading import resolve_model_path
deepspeed.init_distributed(dist_backend="gloo")
r0 = rss()
path = resolve_model_path("builtin:smollm2")
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, extra.pop("load_dtype", "float32")))
r1 = rss()
fused = extra.pop("fused", False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused or None)
zero = {"stage": extra.pop("stage", 2), **extra.pop("zero", {})}
cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
       "zero_optimization": zero, "bf16": {"enabled": extra.pop("bf16", True)}, "zero_allow_untested_optimizer": True,
       "steps_per_print": 10**9, "gradient_clipping": 1.0, **extra}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
r2 = rss()
ids = torch.randint(0, 49152, (2, 88))
t0 = time.time()
for step in range(2):
    for micro in range(4):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss); engine.step()
    r3 = rss()
    t = time.time()
print(json.dumps({"cfg": sys.argv[1], "base": round(r0, 2), "loaded": round(r1, 2), "init": round(r2, 2),
                  "after_steps": round(r3, 2), "peak": round(hwm(), 2), "train_s": round(time.time() - t0, 1)}), flush=True)
