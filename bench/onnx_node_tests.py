"""ONNX's backend node tests through O1/O2 (see onnxforge/testing/node_tests.py).

    .venv/bin/python bench/onnx_node_tests.py --preset O1 --preset O2
    .venv/bin/python bench/onnx_node_tests.py --preset O2 --variant frozen --limit 200 --json out.json
    .venv/bin/python bench/onnx_node_tests.py --preset O1 --case test_gemm_beta --verbose

Prints a table of outcomes per preset and variant (preserved / refused / not-runnable / upstream /
broken), then every refusal, upstream (runtime) difference and broken case with its cause. Exits 1
when any case is broken.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from onnxforge.testing import node_tests  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="O1, O2 or any pipeline string (repeatable; default O1 and O2)")
    parser.add_argument("--variant", action="append", choices=node_tests.VARIANTS,
                        help="inputs (as given) or frozen (inputs as initializers); default both")
    parser.add_argument("--limit", type=int, default=None, help="a deterministic sample of this many cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument("--case", action="append", help="only these case names (repeatable)")
    parser.add_argument("--json", default=None, help="write every outcome to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print each outcome as it comes")
    args = parser.parse_args(argv)
    specs = args.preset or ["O1", "O2"]
    variants = args.variant or list(node_tests.VARIANTS)

    t0 = time.perf_counter()
    if args.case:
        cases = node_tests.collect(args.case)
    elif args.limit:
        cases = node_tests.sample(args.limit, args.seed)
    else:
        cases = sorted(node_tests.collect(), key=lambda c: c.name)
    print(f"{len(cases)} cases collected in {time.perf_counter() - t0:.0f} s", flush=True)
    outcomes = []
    for i, case in enumerate(cases):
        for spec in specs:
            for variant in variants:
                o = node_tests.check(case, spec, variant)
                outcomes.append(o)
                if args.verbose or o.broken:
                    print(f"  {o.case} [{spec}, {variant}] {o.status} {o.cause} {o.detail.splitlines()[0][:200] if o.detail else ''}",
                          flush=True)
        if (i + 1) % 200 == 0:
            print(f"... {i + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s", flush=True)

    counts = collections.Counter((o.spec, o.variant, o.status) for o in outcomes)
    runners = collections.Counter((o.spec, o.variant, o.runner) for o in outcomes if o.status == "preserved")
    print(f"\n{len(cases)} cases, {time.perf_counter() - t0:.0f} s")
    header = f"{'preset':8s} {'variant':8s} " + " ".join(f"{s:>12s}" for s in node_tests.STATUSES)
    print(header + "   (preserved in onnxruntime / reference)")
    for spec in specs:
        for variant in variants:
            row = " ".join(f"{counts[(spec, variant, s)]:12d}" for s in node_tests.STATUSES)
            print(f"{spec:8s} {variant:8s} {row}   ({runners[(spec, variant, 'onnxruntime')]} / "
                  f"{runners[(spec, variant, 'reference')]})")
    for status in ("refused", "upstream", "broken"):
        listed = [o for o in outcomes if o.status == status]
        if listed:
            print(f"\n{status} ({len(listed)}):")
            for o in listed:
                first = o.detail.splitlines()[0][:220] if o.detail else ""
                print(f"  {o.case} [{o.spec}, {o.variant}] {o.cause}: {first}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return 1 if any(o.broken for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
