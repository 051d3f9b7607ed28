"""Where the time goes: onnxruntime's profiler, summarized per op type and per node.

The session is created with ``SessionOptions.enable_profiling``; after ``warmup`` untimed and
``runs`` profiled runs, ``session.end_profiling()`` writes a Chrome-trace JSON, which is parsed
here. Each kernel event (``"cat": "Node"``, name ``<node>_kernel_time``) carries the node's op type
and the provider that ran it in ``args``; each run is a ``"model_run"`` session event. Kernel
events that fall inside the warm-up runs are dropped.

The node names are those of the graph onnxruntime executes: with ``optimize="all"`` (the default,
as deployed) fused nodes get onnxruntime's names and op types (``Conv`` fused with its ``Relu`` is
one ``Conv`` node, NCHWc layout adds ``ReorderInput``/``ReorderOutput``). Use
``optimize="disable"`` to see the model's own nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxforge.errors import ProviderError
from onnxforge.runtime._model import ModelLike, as_ir, is_path
from onnxforge.runtime.bench import bench_feeds
from onnxforge.runtime.providers import short_name
from onnxforge.runtime.session import make_session

__all__ = ["NodeTime", "OpTypeTime", "ProfileResult", "parse_trace", "profile"]

_KERNEL_SUFFIX = "_kernel_time"


@dataclass
class OpTypeTime:
    op_type: str
    providers: list[str]
    nodes: int
    calls: int
    total_ms: float
    mean_ms_per_run: float
    percent: float


@dataclass
class NodeTime:
    name: str
    op_type: str
    provider: str
    calls: int
    total_ms: float
    mean_us: float
    percent: float


@dataclass
class ProfileResult:
    op_types: list[OpTypeTime]
    nodes: list[NodeTime]  # the top-N nodes by total time
    runs: int
    kernel_ms_per_run: float  # sum of kernel times per run
    run_ms_per_run: float  # wall time of a run as the profiler saw it (kernels + overhead)
    providers_used: list[str] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    node_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fallbacks"] = [list(f) for f in self.fallbacks]
        return d


def parse_trace(events: Sequence[Mapping[str, Any]], *, warmup: int = 0, top: int = 10) -> ProfileResult:
    """Summarize onnxruntime profiler ``events`` (the parsed JSON list), skipping ``warmup`` runs."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    if len(runs) <= warmup:
        raise ProviderError(f"the profile holds {len(runs)} runs, not more than the {warmup} warm-up runs")
    timed = runs[warmup:]
    start = timed[0]["ts"]
    n_runs = len(timed)
    per_node: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith(_KERNEL_SUFFIX):
            continue
        if event.get("ts", 0) < start:
            continue
        args = event.get("args") or {}
        name = event["name"][: -len(_KERNEL_SUFFIX)]
        row = per_node.setdefault(
            name,
            {"op_type": args.get("op_name", "?"), "provider": args.get("provider", "?"), "calls": 0, "us": 0.0},
        )
        row["calls"] += 1
        row["us"] += float(event.get("dur", 0))
    total_us = sum(r["us"] for r in per_node.values())

    def pct(us: float) -> float:
        return 100.0 * us / total_us if total_us else 0.0

    by_type: dict[str, dict[str, Any]] = {}
    for row in per_node.values():
        agg = by_type.setdefault(row["op_type"], {"providers": set(), "nodes": 0, "calls": 0, "us": 0.0})
        agg["providers"].add(row["provider"])
        agg["nodes"] += 1
        agg["calls"] += row["calls"]
        agg["us"] += row["us"]
    op_types = sorted(
        (
            OpTypeTime(
                op_type=op,
                providers=sorted(_short(p) for p in agg["providers"]),
                nodes=agg["nodes"],
                calls=agg["calls"],
                total_ms=agg["us"] / 1e3,
                mean_ms_per_run=agg["us"] / 1e3 / n_runs,
                percent=pct(agg["us"]),
            )
            for op, agg in by_type.items()
        ),
        key=lambda r: (-r.total_ms, r.op_type),
    )
    nodes = sorted(
        (
            NodeTime(
                name=name,
                op_type=row["op_type"],
                provider=_short(row["provider"]),
                calls=row["calls"],
                total_ms=row["us"] / 1e3,
                mean_us=row["us"] / max(row["calls"], 1),
                percent=pct(row["us"]),
            )
            for name, row in per_node.items()
        ),
        key=lambda r: (-r.total_ms, r.name),
    )
    run_us = sum(float(r.get("dur", 0)) for r in timed)
    return ProfileResult(
        op_types=op_types,
        nodes=nodes[: max(top, 0)],
        runs=n_runs,
        kernel_ms_per_run=total_us / 1e3 / n_runs,
        run_ms_per_run=run_us / 1e3 / n_runs,
        node_count=len(per_node),
    )


def _short(provider: str) -> str:
    try:
        return short_name(provider)
    except ProviderError:
        return provider


def profile(
    model: ModelLike,
    feeds: Mapping[str, Any] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    provider_options: Any = None,
    threads: int | None = None,
    optimize: str | bool = "all",
    runs: int = 20,
    warmup: int = 3,
    top: int = 10,
    batch_size: int | None = None,
    dim_values: Mapping[str, int] | None = None,
    session_factory: Callable[..., Any] | None = None,
) -> ProfileResult:
    """Profile ``model``: ``warmup`` + ``runs`` runs on ``feeds`` (random ones from the input shapes
    when None), then the time per op type and the ``top`` slowest nodes, each with its provider."""
    if runs < 1:
        raise ProviderError(f"runs must be >= 1, got {runs}")
    import onnxruntime as ort

    folder = tempfile.mkdtemp(prefix="onnxforge-profile-")
    base_factory = session_factory or ort.InferenceSession

    def profiling_factory(arg, sess_options=None, providers=None, provider_options=None):
        sess_options.enable_profiling = True
        sess_options.profile_file_prefix = os.path.join(folder, "ort")
        return base_factory(arg, sess_options=sess_options, providers=providers, provider_options=provider_options)

    try:
        source = model if is_path(model) or isinstance(model, bytes) else as_ir(model)
        info = make_session(
            source, providers, threads=threads, optimize=optimize, provider_options=provider_options,
            session_factory=profiling_factory,
        )
        checked, _ = bench_feeds(info, feeds, batch_size, dim_values)
        for _ in range(warmup + runs):
            info.session.run(None, checked)
        path = info.session.end_profiling()
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = parse_trace(events, warmup=warmup, top=top)
    result.providers_used = list(info.providers_used)
    result.fallbacks = list(info.fallbacks)
    return result
