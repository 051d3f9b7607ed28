"""Malformed input through ``onnxforge optimize``: a clean refusal or a valid model, never anything else.

A seeded mutator breaks real exported models (zoo ``conv_bn``, ``digits_cnn``, ``resnet_style``,
``bert_encoder`` from the TorchScript exporter) in seven ways -- ``cycle`` (a node reads a later
node's output, or its own), ``empty_graph`` (every node removed), ``dangling_input`` (a node input
renamed to a name nothing defines), ``dropped_initializer``, ``byte_flip`` (1-8 random bytes of the
serialized file xor-ed), ``bad_opset`` (default-domain opset 0 / 1 / 999 / missing / given twice) and
``wrong_dtype`` (an initializer's or a graph input's / output's element type changed) -- and runs each
through the CLI in-process (``onnxforge optimize IN -o OUT --passes PIPELINE -q``). Each case ends as

* ``refused``: exit code 2, exactly one ``onnxforge: error:`` line on stderr, no traceback, no output;
* ``valid``: exit code 0 and ``onnx.checker.check_model(OUT, full_check=True)`` accepts the output
  (``ort_fails`` counts those valid outputs onnxruntime still cannot load: information, not a failure);

and anything else is a failure: ``invalid-output`` (exit 0, the checker rejects the output),
``crash`` (a traceback, or an exit code other than 0/2), ``input-modified`` (the input's bytes changed).

    .venv/bin/python bench/fuzz_malformed.py --n 300 [--seed 0] [--passes O1] [--json out.json]

tests/test_malformed.py runs a fixed-seed slice of the same cases.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx

MUTATIONS = (
    "cycle",
    "empty_graph",
    "dangling_input",
    "dropped_initializer",
    "byte_flip",
    "bad_opset",
    "wrong_dtype",
)
MODELS = ("conv_bn", "digits_cnn", "resnet_style", "bert_encoder")


# --------------------------------------------------------------------------- the mutator


def _parse(data: bytes) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """``data`` (a serialized model) broken one way; returns the new bytes and what was done."""
    if kind == "byte_flip":
        out = bytearray(data)
        k = int(rng.integers(1, 9))
        where = sorted(int(i) for i in rng.integers(0, len(out), size=k))
        for i in where:
            out[i] ^= int(rng.integers(1, 256))
        return bytes(out), f"flipped bytes at {where}"
    proto = _parse(data)
    graph = proto.graph
    nodes = list(graph.node)
    if kind == "cycle":
        j = int(rng.integers(0, len(nodes)))
        k = int(rng.integers(j, len(nodes)))
        target = nodes[j]
        slots = [i for i, name in enumerate(target.input) if name] or [0]
        slot = int(rng.choice(slots))
        source = nodes[k].output[0]
        if slot < len(target.input):
            target.input[slot] = source
        else:
            target.input.append(source)
        what = f"node #{j} ({target.op_type}) input {slot} := output of node #{k} ({nodes[k].op_type})"
    elif kind == "empty_graph":
        del graph.node[:]
        if rng.random() < 0.5:
            del graph.initializer[:]
            what = "removed every node and initializer"
        else:
            what = "removed every node"
    elif kind == "dangling_input":
        candidates = [(i, s) for i, n in enumerate(nodes) for s, name in enumerate(n.input) if name]
        i, s = candidates[int(rng.integers(0, len(candidates)))]
        old = nodes[i].input[s]
        nodes[i].input[s] = f"dangling_{int(rng.integers(0, 10**6))}"
        what = f"node #{i} ({nodes[i].op_type}) input {old!r} renamed to {nodes[i].input[s]!r}"
    elif kind == "dropped_initializer":
        used = {name for n in nodes for name in n.input}
        inits = [i for i, t in enumerate(graph.initializer) if t.name in used] or list(range(len(graph.initializer)))
        i = inits[int(rng.integers(0, len(inits)))]
        name = graph.initializer[i].name
        del graph.initializer[i]
        what = f"dropped initializer {name!r}"
    elif kind == "bad_opset":
        default = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
        choice = int(rng.integers(0, 5))
        if choice == 3 and default:
            proto.opset_import.remove(default[0])
            what = "removed the default-domain opset import"
        elif choice == 4 and default:
            proto.opset_import.add(domain="", version=default[0].version - 1)
            what = "default-domain opset imported twice"
        else:
            version = (0, 1, 999)[min(choice, 2)]
            for o in default:
                o.version = version
            what = f"default-domain opset set to {version}"
    elif kind == "wrong_dtype":
        choice = int(rng.integers(0, 4))
        floats = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        if choice == 0 and floats:
            t = floats[int(rng.integers(0, len(floats)))]
            t.data_type = onnx.TensorProto.INT64  # raw data now too short for the shape
            what = f"initializer {t.name!r} FLOAT -> INT64 (same bytes)"
        elif choice == 1 and floats:
            t = floats[int(rng.integers(0, len(floats)))]
            array = onnx.numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
            what = f"initializer {t.name!r} FLOAT -> DOUBLE (consistent data)"
        elif choice == 2:
            v = graph.input[0]
            v.type.tensor_type.elem_type = int(rng.choice([onnx.TensorProto.INT64, onnx.TensorProto.STRING, 0]))
            what = f"graph input {v.name!r} elem_type -> {v.type.tensor_type.elem_type}"
        else:
            v = graph.output[0]
            v.type.tensor_type.elem_type = onnx.TensorProto.INT32
            what = f"graph output {v.name!r} elem_type -> INT32"
    else:
        raise ValueError(f"unknown mutation {kind!r}; choose from {MUTATIONS}")
    return proto.SerializeToString(), what


# --------------------------------------------------------------------------- one case


@dataclasses.dataclass
class Outcome:
    model: str
    kind: str
    seed: int
    what: str
    status: str  # refused | valid | invalid-output | crash | input-modified
    detail: str = ""
    ort_fails: bool = False

    @property
    def ok(self) -> bool:
        return self.status in ("refused", "valid")


def run_case(
    data: bytes, folder: pathlib.Path, *, model: str, kind: str, seed: int, what: str,
    passes: str = "O1", check_ort: bool = False,
) -> Outcome:
    """``onnxforge optimize`` (in-process CLI) on the mutated bytes; classify the result."""
    from click.testing import CliRunner

    from onnxforge.cli import main

    src, dst = folder / "in.onnx", folder / "out.onnx"
    for p in (src, dst):
        if p.exists():
            p.unlink()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(dst), "--passes", passes, "-q"])
    out = Outcome(model, kind, seed, what, "crash")
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    errors = [line for line in stderr.splitlines() if line.startswith("onnxforge: error:")]
    if hashlib.sha256(src.read_bytes()).hexdigest() != digest:
        out.status, out.detail = "input-modified", "the input file changed"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        out.detail = f"{type(result.exception).__name__}: {str(result.exception).splitlines()[0][:200]}"
    elif result.exit_code == 2:
        if len(errors) == 1 and not dst.exists() and "Traceback" not in stderr:
            out.status, out.detail = "refused", errors[0]
        else:
            out.detail = f"exit 2 but stderr {stderr[-300:]!r}, output exists: {dst.exists()}"
    elif result.exit_code == 0:
        try:
            onnx.checker.check_model(str(dst), full_check=True)
            out.status = "valid"
        except Exception as e:  # noqa: BLE001 -- any checker complaint is the finding
            out.status, out.detail = "invalid-output", " ".join(str(e).split())[:300]
        if out.status == "valid" and check_ort:
            import onnxruntime as ort

            try:
                ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001
                out.ort_fails = True
    else:
        out.detail = f"exit code {result.exit_code}: {errors[-1] if errors else stderr[-300:]!r}"
    return out


def model_bytes(names=MODELS) -> dict[str, bytes]:
    """Serialized exports of the zoo models (disk-cached exports; TorchScript for bert_encoder)."""
    import onnx_ir as ir

    from onnxforge.testing import zoo

    out = {}
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = zoo.export_cached(name, dynamo=name != "bert_encoder")
        out[name] = ir.serde.serialize_model(model).SerializeToString()
    return out


def cases(n: int, seed: int, names=MODELS):
    """``n`` (model, kind, case seed) triples, cycling over kinds and models."""
    for i in range(n):
        yield names[(i // len(MUTATIONS)) % len(names)], MUTATIONS[i % len(MUTATIONS)], seed * 100_003 + i


def fuzz(n: int, seed: int = 0, passes: str = "O1", names=MODELS, check_ort: bool = False,
         progress: bool = False) -> list[Outcome]:
    sources = model_bytes(names)
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        for model, kind, case_seed in cases(n, seed, names):
            data, what = mutate(sources[model], kind, np.random.default_rng(case_seed))
            outcomes.append(run_case(data, folder, model=model, kind=kind, seed=case_seed, what=what,
                                     passes=passes, check_ort=check_ort))
            if progress and len(outcomes) % 25 == 0:
                print(f"  {len(outcomes)}/{n}", file=sys.stderr)
    return outcomes


def summarize(outcomes: list[Outcome]) -> dict:
    table = collections.defaultdict(collections.Counter)
    for o in outcomes:
        table[o.kind][o.status] += 1
        if o.ort_fails:
            table[o.kind]["ort_fails"] += 1
    return {kind: dict(counter) for kind, counter in table.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", default="O1")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write every outcome here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    outcomes = fuzz(args.n, args.seed, args.passes, tuple(args.models.split(",")), check_ort=True, progress=True)
    seconds = time.perf_counter() - t0
    summary = summarize(outcomes)
    print(f"{len(outcomes)} cases, pipeline {args.passes}, seed {args.seed}, {seconds:.0f} s")
    statuses = ["refused", "valid", "invalid-output", "crash", "input-modified", "ort_fails"]
    print(f"{'mutation':22s}" + "".join(f"{s:>16s}" for s in statuses))
    for kind in MUTATIONS:
        row = summary.get(kind, {})
        print(f"{kind:22s}" + "".join(f"{row.get(s, 0):16d}" for s in statuses))
    bad = [o for o in outcomes if not o.ok]
    for o in bad[:20]:
        print(f"FAIL {o.model} {o.kind} seed={o.seed}: {o.status}: {o.what}: {o.detail}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "n": len(outcomes), "passes": args.passes, "seed": args.seed, "seconds": seconds,
            "summary": summary, "outcomes": [dataclasses.asdict(o) for o in outcomes],
        }, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
