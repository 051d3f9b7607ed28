"""Pipeline stages and the Ray executor against one process (throughput, interleaved rounds).

    .venv/bin/python bench/bench_stages_ray.py [--rounds 3] [--samples 64]

Model: the zoo's ``yolo_style`` (3x64x64, three outputs), batch 1, onnxruntime CPU with optimizations
off (so the stage outputs equal the whole model's bit for bit; checked). Each round runs, in turn:
one process with 1 thread; one process with 2 threads; the 2-stage pipeline (1 thread per stage);
2 local worker processes (1 thread each); 2 Ray tasks (1 thread each, one local Ray instance for the
whole run). Throughput = samples / compute time (sessions ready to last output; process start and
Ray start excluded, reported separately as wall time). Medians over rounds and ratios to 1 process x 1 thread.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--stages", type=int, default=2)
    args = parser.parse_args()
    import ray

    from onnxforge.ir.io import model_to_bytes
    from onnxforge.runtime.parallel import run_parallel, run_ray
    from onnxforge.runtime.stages import measure_costs, plan_stages, run_pipeline
    from onnxforge.testing import zoo

    model = zoo.export_model("yolo_style")
    blob = model_to_bytes(model)
    plan = plan_stages(blob, args.stages, costs=measure_costs(blob))
    print("plan:", [(s.nodes, round(s.cost_us), s.inputs) for s in plan.stages], flush=True)
    data = {"input": np.random.default_rng(0).standard_normal((args.samples, 3, 64, 64)).astype(np.float32)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = {
        "1 process x 1 thread": lambda: run_parallel(blob, data, workers=1, threads_per_worker=1, optimize="disable"),
        "1 process x 2 threads": lambda: run_parallel(blob, data, workers=1, threads_per_worker=2, optimize="disable"),
        f"{args.stages}-stage pipeline x 1 thread": lambda: run_pipeline(
            plan.models, data, threads_per_stage=1, optimize="disable", output_names=plan.outputs),
        "2 local workers x 1 thread": lambda: run_parallel(blob, data, workers=2, threads_per_worker=1, optimize="disable"),
        "2 Ray tasks x 1 thread": lambda: run_ray(blob, data, workers=2, threads_per_worker=1, optimize="disable"),
    }
    tput = {k: [] for k in runs}
    wall = {k: [] for k in runs}
    reference = None
    for r in range(args.rounds):
        for name, fn in runs.items():
            res = fn()
            if reference is None:
                reference = res.outputs
            for k, v in reference.items():  # the same outputs, in order (bit for bit at 1 thread per session)
                if "2 threads" in name:  # a 2-thread session may split reductions differently
                    np.testing.assert_allclose(res.outputs[k], v, rtol=1e-4, atol=1e-5)
                else:
                    assert np.array_equal(v, res.outputs[k]), (name, k)
            tput[name].append(res.samples_per_s)
            wall[name].append(res.wall_s)
            print(f"round {r} {name}: {res.samples_per_s:.1f} samples/s", flush=True)
    ray.shutdown()
    base = statistics.median(tput["1 process x 1 thread"])
    print("| executor (yolo_style, batch 1) | samples/s (median) | vs 1 process x 1 thread | wall s incl. start |")
    print("|---|---:|---:|---:|")
    for name in runs:
        t = statistics.median(tput[name])
        print(f"| {name} | {t:.1f} | {t / base:.2f}x | {statistics.median(wall[name]):.1f} |")


if __name__ == "__main__":
    main()
