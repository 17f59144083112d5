"""pytest-benchmark suite of the diffusion-classifier engine (``pytest benchmarks --benchmark-only``).

One group: the engine (with its options), plain diffusers batching (rows batched, nothing shared) and the
per-(image, concept, timestep) loop on the same DC problem — the tiny model on the CPU, the SD 1.5
architecture (random weights, bf16, 64×64 latents = 512 px) on a GPU. ``extra_info`` carries passes per call
so passes/s = passes / mean. ``bench_dc.py`` reports the same with FLOP counts.
"""
import argparse

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench_dc import setup  # noqa: E402

from fastcp.dc import DiffusionClassifier, errors_loop  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def problem():
    args = argparse.Namespace(sd15=CUDA, concepts=8 if CUDA else 2, images=4 if CUDA else 1,
                              timesteps=4 if CUDA else 2)
    dev = torch.device("cuda" if CUDA else "cpu")
    return setup(args, dev, torch.bfloat16 if CUDA else torch.float32), args


@pytest.mark.parametrize("provider", ["engine", "engine_channels_last", "plain_batching", "loop"])
def test_dc_errors(benchmark, problem, provider):
    (unet, sched, cond, x, noise, ts, ids), args = problem
    if provider == "loop" and CUDA:
        pytest.skip("the loop baseline takes minutes at SD 1.5 size: bench_dc.py times it once")
    clf = {"engine": lambda: DiffusionClassifier(unet, sched),
           "engine_channels_last": lambda: DiffusionClassifier(unet, sched, channels_last=True),
           "plain_batching": lambda: DiffusionClassifier(unet, sched, kv_cache=False, share_prefix=False),
           "loop": lambda: None}[provider]()

    def run():
        with torch.no_grad():
            if clf is None:
                errors_loop(unet, sched, x, cond, ts, noise, ids)
            else:
                clf.errors(x, cond, ts, noise, ids, batch_size=64)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = "dc_errors"
    benchmark.extra_info["passes"] = args.images * args.concepts * args.timesteps
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    if provider == "engine_channels_last":
        unet.to(memory_format=torch.contiguous_format)
