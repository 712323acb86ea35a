"""Does an idle vLLM engine in this process slow the HF engine down? (docs/performance.md,
"HF engine vs vLLM": the A/B behind "Suspect" there.)

Times one HF-engine batch (HiRED-20 %, 4 items, 8 tokens, float32, the `scaled` preset)
before a vLLM engine starts, beside the started engine (idle, and right after it ran a
generate), and after it stopped; prints each wall and the CPU seconds vLLM's processes
used meanwhile. Run in a venv with vLLM (CPU build): `python docs/checks/hf_beside_vllm.py`.
"""

import time

import psutil
import torch

from hired_batch.bench.compare_engines import start_vllm, stop_vllm
from hired_batch.bench.model_sizes import ensure_checkpoint
from hired_batch.bench.workload import Spec, workload
from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.dims import ModelDims, kv_bytes_per_token
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.weights import Preprocessor, load_llava


def main():
    path = str(ensure_checkpoint("scaled"))
    model, proc = load_llava(ModelConfig(path=path, dtype="float32", device="cpu"))
    pre = Preprocessor(proc, model.config.model_type)
    engine = HiredEngine(
        model, proc, SelectionConfig(selector="hired", budget=0.2), GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    )
    items = [pre(im, q) for im, q in workload(4, seed=1)]

    def hf_batch(tag):
        kids = psutil.Process().children(recursive=True)
        cpu0 = sum(sum(k.cpu_times()[:2]) for k in kids)
        t0 = time.perf_counter()
        engine.generate_prepared(items)
        wall = time.perf_counter() - t0
        cpu = sum(sum(k.cpu_times()[:2]) for k in kids) - cpu0
        print(f"{tag}: HF batch {wall:.2f} s; vLLM processes used {cpu:.2f} CPU s meanwhile", flush=True)

    for tag in ("warm-up", "before vLLM", "before vLLM"):
        hf_batch(tag)
    threads = torch.get_num_threads()
    dims = ModelDims.from_hf(model.config, 4)
    llm = start_vllm(
        path, Spec("hired", 0.2), model.config.model_type, "float32", 4, 3072, 4 * 3072 * kv_bytes_per_token(dims), True
    )
    torch.set_num_threads(threads)
    hf_batch("vLLM started, idle")
    from vllm import SamplingParams

    requests = [
        {"prompt_token_ids": pre(im, q).input_ids.tolist(), "multi_modal_data": {"image": im}}
        for im, q in workload(4, seed=2)
    ]
    for _ in range(2):
        t0 = time.perf_counter()
        llm.generate(requests, SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0), use_tqdm=False)
        print(f"vLLM generate (4 items): {time.perf_counter() - t0:.2f} s", flush=True)
        hf_batch("right after a vLLM generate")
    stop_vllm(llm)
    hf_batch("vLLM stopped")


if __name__ == "__main__":  # vLLM starts processes with spawn
    main()
