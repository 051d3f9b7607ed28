"""Long differential-fuzzing runs of the lossless presets and passes (see onnxforge/testing/fuzz.py).

    .venv/bin/python bench/fuzz_lossless.py --n 5000 --preset O1
    .venv/bin/python bench/fuzz_lossless.py --n 5000 --preset O2
    .venv/bin/python bench/fuzz_lossless.py --n 500 --preset each-pass

About 30% of the cases carry wrong declared shapes (``--no-stale``: none); their outcomes are also
printed apart. Prints broken/total by cause (and by pass for ``each-pass``); writes each distinct failure, minimized
(blocks dropped while the same cause remains), as ``<out>/<spec>-<cause>-seed<N>.onnx`` with a
``.txt`` holding the case and the detail. ``refused`` (a typed UnsupportedModelError) and ``skipped``
(the generator made a model onnxruntime rejects) are counted but are not failures.
"""

from __future__ import annotations

import argparse
import collections
import logging
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from onnxforge.passes.spec import PRESETS  # noqa: E402
from onnxforge.testing import fuzz  # noqa: E402


def _each_pass() -> list[str]:
    return list(dict.fromkeys(PRESETS["O2"].split(",")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="number of random cases")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--preset", default="O1", help="O1, O2, each-pass, or any pipeline string")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--out", default="fuzz-failures", help="folder for minimized failing models")
    parser.add_argument("--no-minimize", action="store_true")
    parser.add_argument("--no-stale", action="store_true",
                        help="no wrong declared shapes (by default ~30%% of the cases carry them)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the wrapped passes log per skipped initializer

    specs = _each_pass() if args.preset == "each-pass" else [args.preset]
    out = pathlib.Path(args.out)
    causes: dict[str, collections.Counter] = {s: collections.Counter() for s in specs}
    stale: dict[str, collections.Counter] = {s: collections.Counter() for s in specs}  # the stale-shape cases
    written: set[tuple[str, str]] = set()
    t0 = time.perf_counter()
    for i, seed in enumerate(range(args.start, args.start + args.n)):
        case = fuzz.random_case(seed, stale_shapes=not args.no_stale)
        for spec in specs:
            outcome = fuzz.check_case(case, spec, args.target)
            causes[spec][outcome.cause] += 1
            if case.stale:
                stale[spec][outcome.cause] += 1
            if outcome.broken and (spec, outcome.cause) not in written:
                written.add((spec, outcome.cause))
                small = case if args.no_minimize else fuzz.minimize(case, spec, outcome.cause, args.target)
                detail = fuzz.check_case(small, spec, args.target).detail
                out.mkdir(parents=True, exist_ok=True)
                stem = f"{spec.replace(',', '+')}-{outcome.cause}-seed{seed}"
                (out / f"{stem}.onnx").write_bytes(fuzz.build(small)[0].SerializeToString())
                (out / f"{stem}.txt").write_text(f"{small}\npipeline: {spec}\n{outcome.cause}: {detail}\n")
                print(f"[{seed}] {spec}: {outcome.cause}: {detail.splitlines()[0][:160]}\n    {small}", flush=True)
        if (i + 1) % 500 == 0:
            print(f"... {i + 1}/{args.n} cases, {time.perf_counter() - t0:.0f} s", flush=True)
    total_broken = 0
    print(f"\n{args.n} cases (seeds {args.start}..{args.start + args.n - 1}), target {args.target}, "
          f"{time.perf_counter() - t0:.0f} s")
    for spec, counter in causes.items():
        broken = sum(n for c, n in counter.items() if fuzz.Outcome(c).broken)
        valid = sum(n for c, n in counter.items() if c != "skipped")
        total_broken += broken
        rest = ", ".join(f"{c} {n}" for c, n in sorted(counter.items()))
        print(f"{spec:24s} broken {broken}/{valid}   ({rest})")
        if stale[spec]:
            s_broken = sum(n for c, n in stale[spec].items() if fuzz.Outcome(c).broken)
            s_valid = sum(n for c, n in stale[spec].items() if c != "skipped")
            rest = ", ".join(f"{c} {n}" for c, n in sorted(stale[spec].items()))
            print(f"{'  with stale shapes':24s} broken {s_broken}/{s_valid}   ({rest})")
    return 1 if total_broken else 0


if __name__ == "__main__":
    sys.exit(main())
