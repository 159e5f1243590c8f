"""Where the hybrid layout's in-process weight hand-off spends its time: SmolLM2-135M from a transformers model into an
in-process vLLM-CPU engine (the worker extension's own calls), 4 repetitions, each timing separately:

  checksum_all          the checksums of all 538 MB (fp32) as the engine's loader computes them (checksum_received)
  load(incl pack)       the layerwise reload of every bucket; pack_in_load: vLLM's repacking of the 121 linear
                        weights into its CPU GEMM kernels (dispatch_cpu_unquantized_gemm) inside it
  finish                rlhf_finish_update; pack_in_finish: the tied LM head's repack (refresh_tied_heads)
  learner_probe / engine_probe   the 16-token probe log-probs on each side
  live_check            the check of every live parameter (the kernels read back: an engine's first sync)
  threaded_* / seq_*    checksums beside the load on a second thread, and the learner's probe beside the engine's
                        finish + probe, against the same work in sequence
  --stream-ab           instead: a CPU bf16 learner's hand-off (fp32 weights into a bf16 engine, verified) as it
                        was, a bucket cast, then checksummed, then loaded, against the worker casting, checksumming
                        and loading one tensor at a time (rlhf_load_bucket(bucket, dtype)), alternating, and the ratio

    flock /tmp/rlhf_ray_heavy.lock .venv/bin/python benchmarks/bench_hybrid_handoff.py [float32|bfloat16] [--stream-ab]

Not a test; repetition 0 includes one-time costs (the engine's first probe request).
"""
import os, sys, time
from pathlib import Path
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dtype_name = args[0] if args else "float32"
    dtype = getattr(torch, dtype_name)
    if "--stream-ab" in sys.argv:
        return stream_ab(dtype_name)
    torch.set_num_threads(2)
    from rlhf_ray.models.smollm2 import smollm2_path
    from transformers import AutoModelForCausalLM
    from vllm import LLM
    import vllm._custom_ops as ops
    import vllm.model_executor.layers.utils as lu
    from rlhf_ray.weight_sync import checksum_received, iter_buckets, lora_merged_parameters, probe_token_ids
    path = str(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    llm = LLM(model=path, dtype=dtype_name, worker_extension_cls="rlhf_ray.vllm_worker_ext.WorkerExtension",
              kv_cache_memory_bytes=1 << 30, max_model_len=512, enforce_eager=True, seed=0)
    print("threads", torch.get_num_threads())
    # time repacking
    acc = {"pack": 0.0, "n": 0}
    orig = lu.dispatch_cpu_unquantized_gemm
    def timed(layer, remove_weight):
        t = time.perf_counter(); orig(layer, remove_weight); acc["pack"] += time.perf_counter() - t; acc["n"] += 1
    lu.dispatch_cpu_unquantized_gemm = timed
    worker = llm.llm_engine.model_executor.driver_worker.worker
    named = list(lora_merged_parameters(model))
    buckets = list(iter_buckets(named, 256 << 20))
    ids = probe_token_ids(49152, 16)
    for rep in range(4):
        r = {}
        t = time.perf_counter(); d = {}
        for b in buckets: checksum_received(b, d)
        r["checksum_all"] = time.perf_counter() - t
        acc["pack"] = 0.0; acc["n"] = 0
        t = time.perf_counter(); llm.collective_rpc("rlhf_begin_update", args=(False,)); r["begin"] = time.perf_counter() - t
        t = time.perf_counter()
        for b in buckets: llm.collective_rpc("rlhf_load_bucket", args=(b,))
        r["load(incl pack)"] = time.perf_counter() - t; r["pack_in_load"] = acc["pack"]; r["npack_load"] = acc["n"]
        acc["pack"] = 0.0
        t = time.perf_counter(); llm.collective_rpc("rlhf_finish_update"); r["finish"] = time.perf_counter() - t
        r["pack_in_finish"] = acc["pack"]
        t = time.perf_counter(); llm.reset_prefix_cache(); r["reset_cache"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.tensor([ids]); lg = model(input_ids=x).logits[0, :-1].float()
            mine = torch.log_softmax(lg, -1).gather(1, x[0, 1:, None])[:, 0].tolist()
        r["learner_probe"] = time.perf_counter() - t
        t = time.perf_counter()
        from vllm import SamplingParams
        [out] = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        theirs = [e[tok].logprob for tok, e in zip(ids[1:], out.prompt_logprobs[1:])]
        r["engine_probe"] = time.perf_counter() - t
        r["probe_diff"] = max(abs(a - b) for a, b in zip(mine, theirs))
        t = time.perf_counter(); llm.collective_rpc("rlhf_checksum_pieces"); r["live_check"] = time.perf_counter() - t
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        llm.collective_rpc("rlhf_begin_update", args=(False,))
        t = time.perf_counter(); d2 = {}
        for b in buckets:
            f = pool.submit(checksum_received, b, d2)
            llm.collective_rpc("rlhf_load_bucket", args=(b,))
            f.result()
        r["threaded_ck+load"] = time.perf_counter() - t
        llm.collective_rpc("rlhf_finish_update")
        t = time.perf_counter(); d3 = {}
        llm.collective_rpc("rlhf_begin_update", args=(False,))
        for b in buckets:
            checksum_received(b, d3); llm.collective_rpc("rlhf_load_bucket", args=(b,))
        r["seq_ck+load"] = time.perf_counter() - t
        llm.collective_rpc("rlhf_finish_update")
        # learner probe in a thread while the engine finishes + probes
        llm.collective_rpc("rlhf_begin_update", args=(False,))
        for b in buckets: llm.collective_rpc("rlhf_load_bucket", args=(b,))
        def lp():
            with torch.no_grad():
                x = torch.tensor([ids]); lg = model(input_ids=x).logits[0, :-1].float()
                return torch.log_softmax(lg, -1).gather(1, x[0, 1:, None])[:, 0].tolist()
        t = time.perf_counter()
        f = pool.submit(lp)
        llm.collective_rpc("rlhf_finish_update")
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        f.result()
        r["threaded_finish+probes"] = time.perf_counter() - t
        llm.collective_rpc("rlhf_begin_update", args=(False,))
        for b in buckets: llm.collective_rpc("rlhf_load_bucket", args=(b,))
        t = time.perf_counter()
        lp()
        llm.collective_rpc("rlhf_finish_update")
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        r["seq_finish+probes"] = time.perf_counter() - t
        print(rep, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

def stream_ab(engine_dtype: str, repeats: int = 6) -> None:
    """A CPU bf16 learner's verified hand-off: fp32 buckets into a bf16 engine, whole buckets vs a tensor at a time."""
    import statistics

    from rlhf_ray.models.smollm2 import smollm2_path
    from rlhf_ray.weight_sync import iter_buckets, lora_merged_parameters
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    torch.set_num_threads(2)
    dtype = getattr(torch, engine_dtype)
    path = str(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=path, dtype=engine_dtype, worker_extension_cls="rlhf_ray.vllm_worker_ext.WorkerExtension",
              kv_cache_memory_bytes=1 << 30, max_model_len=512, enforce_eager=True, seed=0)
    buckets = list(iter_buckets(list(lora_merged_parameters(model)), 256 << 20))

    def bucketed():  # as the hybrid sender did: the whole bucket cast, then checksummed and loaded by the worker
        for b in buckets:
            llm.collective_rpc("rlhf_load_bucket", args=([(n, t.to(dtype)) for n, t in b],))

    def streamed():  # the worker casts, checksums and loads one tensor at a time
        for b in buckets:
            llm.collective_rpc("rlhf_load_bucket", args=(b, dtype))

    seconds, received = {"bucketed": [], "streamed": []}, {}
    for rep in range(repeats + 1):
        for name, run in (("bucketed", bucketed), ("streamed", streamed)):
            llm.collective_rpc("rlhf_begin_update", args=(True,))
            t = time.perf_counter()
            run()
            took = time.perf_counter() - t
            llm.collective_rpc("rlhf_finish_update")
            received[name] = llm.collective_rpc("rlhf_received_checksums")[0]
            if rep:  # repetition 0 warms up
                seconds[name].append(took)
    assert received["bucketed"] == received["streamed"], "the two hand-offs received different checksums"
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"fp32 learner -> {engine_dtype} engine, verified load of {len(buckets)} bucket(s), median of {repeats}: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in median.items())
          + f"; ratio bucketed / streamed {median['bucketed'] / median['streamed']:.2f}")


if __name__ == "__main__":
    main()
