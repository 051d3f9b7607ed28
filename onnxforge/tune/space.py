"""The search space of ``onnxforge tune``: which passes may run, and the values their options may take.

A space is a lossless ``base`` pipeline that always runs first, then an ordered list of *slots*. A
slot is one pass with, per option, a fixed value, a list of choices, or a numeric range. A slot may
be ``optional`` (searched on and off), belong to an ``exclusive`` group (at most one pass of the group
runs, e.g. ``quantize-int8`` or ``quantize-dynamic`` or neither), and ``require`` an earlier pass
(``reconstruct`` only makes sense after ``prune-channels``). A *candidate* is one assignment of the
parameters; it turns into a plain pipeline string (:meth:`Space.pipeline`), which is what gets
built, cached and saved.

File form (``--space tune.toml``; the same keys may sit in a ``[tune]`` table, so a project can keep
them beside its ``onnxforge.toml`` in one file of its own)::

    base = "O1"                      # lossless prefix, always run (a preset or a pipeline string)

    [[space]]
    pass = "prune-channels"
    optional = true                  # also try without it
    [space.options]
    ratio = { low = 0.1, high = 0.6, step = 0.1 }   # a range (ints if low/high/step are ints)
    criterion = ["l1", "activation"]                # choices
    round_to = 4                                    # a fixed value

    [[space]]
    pass = "reconstruct"
    optional = true
    requires = "prune-channels"      # only when prune-channels runs

    [[space]]
    pass = "quantize-int8"
    exclusive = "quantize"           # int8 or dynamic or neither
    [space.options]
    calibration = ["minmax", "percentile", "entropy"]
    per_channel = [true, false]

    [[space]]
    pass = "quantize-dynamic"
    exclusive = "quantize"

Parameter names are ``pass.option`` for options, ``pass`` for the on/off switch of an optional slot
and ``exclusive:group`` for the choice within a group (its values are the pass names and ``none``).

A pass may fill more than one slot: give each extra slot a ``label``, which then stands for the pass
in parameter names, ``requires`` and groups. Quantization-aware training is ``distill`` *after*
``quantize-int8``, beside a float ``distill`` before it::

    [[space]]
    pass = "quantize-int8"
    optional = true

    [[space]]
    pass = "distill"
    label = "qat"                    # parameters qat, qat.epochs, ...
    optional = true
    requires = "quantize-int8"
    options = { loss = "auto", epochs = 2 }
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import typing
from typing import Any

from onnxforge.errors import PipelineSpecError
from onnxforge.passes.spec import read_toml

NONE = "none"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a list of values."""

    values: tuple[Any, ...]

    def grid(self) -> list[Any]:
        return list(self.values)


@dataclasses.dataclass(frozen=True)
class Range:
    """A number in ``[low, high]``; ``step`` makes it discrete (and gridable)."""

    low: float
    high: float
    step: float | None = None
    integer: bool = False

    def grid(self) -> list[Any]:
        if self.step is None:
            raise PipelineSpecError(
                f"range [{self.low}, {self.high}] has no 'step': a grid needs one (or use --strategy optuna)"
            )
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(round(v)) for v in values] if self.integer else [round(v, 10) for v in values]


Dim = typing.Union[Choice, Range]


@dataclasses.dataclass
class Slot:
    """One pass of the space and the values its options may take."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # option -> Dim or fixed value
    optional: bool = False
    exclusive: str | None = None
    requires: str | None = None
    label: str | None = None  # the slot's name in parameters when the pass fills several slots

    @property
    def key(self) -> str:
        """The slot's name in parameter names, ``requires`` and groups: its label, else its pass."""
        return self.label or self.name

    def searched(self) -> dict[str, Dim]:
        return {k: v for k, v in self.options.items() if isinstance(v, (Choice, Range))}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if not isinstance(v, (Choice, Range))}


@dataclasses.dataclass
class Space:
    """A lossless base pipeline and the slots searched after it. ``notes`` says what was left out.
    ``first_candidates`` (parameters as :meth:`suggest` draws them) are evaluated right after the
    base, before the search proposes its own."""

    base: str = ""
    slots: list[Slot] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    first_candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    # --- parameters -----------------------------------------------------------------------------

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in self.slots:
            if s.exclusive:
                out.setdefault(s.exclusive, []).append(s.key)
        return out

    def enabled(self, params: dict[str, Any]) -> list[Slot]:
        """The slots that run for ``params``, in order."""
        on: list[Slot] = []
        names: set[str] = set()
        for s in self.slots:
            if s.exclusive and params.get(f"exclusive:{s.exclusive}", NONE) != s.key:
                continue
            if s.optional and not s.exclusive and not params.get(s.key, False):
                continue
            if s.requires and s.requires not in names:
                continue
            on.append(s)
            names.add(s.key)
        return on

    def pipeline(self, params: dict[str, Any]) -> str:
        """The pipeline string for one candidate (base first, then the enabled slots)."""
        from onnxforge.passes.spec import PassSpec, format_pipeline, parse_pipeline

        specs = parse_pipeline(self.base) if self.base else []
        for s in self.enabled(params):
            options = {key: (params[f"{s.key}.{key}"] if isinstance(v, (Choice, Range)) else v)
                       for key, v in s.options.items()}
            # None is the pass's default (e.g. max_drop: no accuracy budget): left out of the string
            specs.append(PassSpec(s.name, {k: v for k, v in options.items() if v is not None}))
        if not specs:
            return ""
        return format_pipeline(specs)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw a candidate from an Optuna trial (define-by-run: options of passes that are off are
        not drawn)."""
        params: dict[str, Any] = {}
        for group, names in self.groups().items():
            params[f"exclusive:{group}"] = trial.suggest_categorical(f"exclusive:{group}", [NONE, *names])
        seen: set[str] = set()
        for s in self.slots:
            if s.requires and s.requires not in seen:
                continue
            if s.exclusive:
                if params[f"exclusive:{s.exclusive}"] != s.key:
                    continue
            elif s.optional:
                params[s.key] = trial.suggest_categorical(s.key, [False, True])
                if not params[s.key]:
                    continue
            seen.add(s.key)
            for key, dim in s.searched().items():
                pname = f"{s.key}.{key}"
                if isinstance(dim, Choice):
                    params[pname] = trial.suggest_categorical(pname, list(dim.values))
                elif dim.integer:
                    params[pname] = trial.suggest_int(pname, int(dim.low), int(dim.high), step=int(dim.step or 1))
                else:
                    value = trial.suggest_float(pname, dim.low, dim.high, step=dim.step)
                    params[pname] = round(value, 10)
        return params

    def grid(self) -> list[dict[str, Any]]:
        """Every candidate (options of passes that are off are not varied); duplicates removed, in a
        fixed order."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for params in self._grid_from(0, {}, frozenset()):
            key = self.pipeline(params)
            if key not in seen:
                seen.add(key)
                out.append(params)
        return out

    def _grid_from(self, i: int, params: dict[str, Any], on: frozenset[str]):
        if i == len(self.slots):
            yield dict(params)
            return
        s = self.slots[i]
        choices: list[bool] = []
        if s.requires and s.requires not in on:
            choices = [False]
        elif s.exclusive:
            key = f"exclusive:{s.exclusive}"
            members = self.groups()[s.exclusive]
            if key not in params:
                # The group is decided at its first member: iterate over every choice there.
                for value in [NONE, *members]:
                    yield from self._grid_from(i, {**params, key: value}, on)
                return
            choices = [params[key] == s.key]
        elif s.optional:
            choices = [False, True]
        else:
            choices = [True]
        for active in choices:
            p = dict(params)
            if s.optional and not s.exclusive and not (s.requires and s.requires not in on):
                p[s.key] = active
            if not active:
                yield from self._grid_from(i + 1, p, on)
                continue
            dims = s.searched()
            for values in itertools.product(*(d.grid() for d in dims.values())):
                q = dict(p)
                q.update({f"{s.key}.{k}": v for k, v in zip(dims, values)})
                yield from self._grid_from(i + 1, q, on | {s.key})

    def size(self) -> int | None:
        """The number of distinct candidates, or None when a range has no step."""
        try:
            return len(self.grid())
        except PipelineSpecError:
            return None

    def describe(self) -> list[str]:
        lines = [f"base: {self.base or '(none)'}"]
        for s in self.slots:
            flags = []
            if s.optional:
                flags.append("optional")
            if s.exclusive:
                flags.append(f"exclusive={s.exclusive}")
            if s.requires:
                flags.append(f"requires={s.requires}")
            if s.label:
                flags.append(f"label={s.label}")
            opts = ", ".join(f"{k}={_dim_text(v)}" for k, v in s.options.items())
            lines.append(f"{s.name}({opts})" + (f" [{', '.join(flags)}]" if flags else ""))
        return lines + [f"note: {n}" for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "slots": [_slot_dict(s) for s in self.slots], "notes": self.notes}


def _dim_text(v: Any) -> str:
    if isinstance(v, Choice):
        return "{" + "|".join(map(str, v.values)) + "}"
    if isinstance(v, Range):
        return f"[{v.low}..{v.high}" + (f" step {v.step}]" if v.step else "]")
    return repr(v)


def _slot_dict(s: Slot) -> dict[str, Any]:
    opts = {}
    for k, v in s.options.items():
        if isinstance(v, Choice):
            opts[k] = list(v.values)
        elif isinstance(v, Range):
            opts[k] = {"low": v.low, "high": v.high, **({"step": v.step} if v.step else {})}
        else:
            opts[k] = v
    out = {"pass": s.name, "optional": s.optional, "exclusive": s.exclusive, "requires": s.requires,
           "options": opts}
    return {**out, "label": s.label} if s.label else out


# --------------------------------------------------------------------------------- defaults


def _literal_choices(cls: type, option: str) -> tuple[Any, ...] | None:
    from onnxforge.passes.registry import _type_hints

    ann = _type_hints(cls).get(option)
    if ann is not None and typing.get_origin(ann) is typing.Literal:
        return typing.get_args(ann)
    return None


def _available_base(preset: str, passes: dict[str, type], notes: list[str]) -> str:
    from onnxforge.passes.spec import PRESETS, format_pipeline, parse_pipeline

    specs = parse_pipeline(PRESETS.get(preset, preset))
    missing = sorted({s.name for s in specs if s.name not in passes})
    if missing:
        notes.append(f"base {preset}: pass(es) {', '.join(missing)} not registered here, left out")
    return format_pipeline([s for s in specs if s.name in passes])


def default_space(*, with_calibration: bool = True, base: str = "O1", max_drop: float | None = None) -> Space:
    """The default space: ``prune-channels`` (target_latency 0.5..0.9, criterion), ``reconstruct``,
    ``quantize-int8`` (calibration method, bias correction, per-channel, weight rounding), given tune's
    ``max_drop`` also mixed-precision int8 (slot ``mixed-int8``: ``max_drop`` = tune's, measured in
    tune's own metric and held at 90 % confidence, see :mod:`onnxforge.tune.budget`) or
    ``quantize-dynamic``, ``fuse`` on/off; O3's int8 options are the first candidates, and (given
    ``max_drop``) O3's int8 as the preset builds it (slot ``o3-int8``: its own proxy budget and latency
    guard, ``budget_measure=proxy``; judged by tune's metric like every candidate).

    A pass missing from the registry is left out, with a note; so is an option it does not have, and
    a choice its annotation does not allow. Without calibration data the data-driven passes and
    criteria are left out too.
    """
    from onnxforge.passes.registry import available_passes
    from onnxforge.passes.base import option_specs

    passes = available_passes()
    notes: list[str] = []
    space = Space(base=_available_base(base, passes, notes), notes=notes)

    def add(name: str, options: dict[str, Any], **flags: Any) -> None:
        if name not in passes:
            notes.append(f"{name}: not registered here, left out of the space")
            return
        if flags.pop("needs_data", False) and not with_calibration:
            notes.append(f"{name}: needs calibration data, left out")
            return
        cls = passes[name]
        known = option_specs(cls)
        kept: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                notes.append(f"{name}: has no option {key!r}, not searched")
                continue
            if isinstance(value, Choice):
                allowed = _literal_choices(cls, key)
                values = tuple(v for v in value.values if allowed is None or v in allowed)
                dropped = [v for v in value.values if v not in values]
                if dropped:
                    notes.append(f"{name}.{key}: {dropped} not offered by the pass, left out")
                if not values:
                    continue
                value = Choice(values) if len(values) > 1 else values[0]
            kept[key] = value
        space.slots.append(Slot(name, kept, **flags))

    criteria = ["l1", "activation"] if with_calibration else ["l1"]
    add("fuse", {}, optional=True)
    # target_latency, not ratio: the cut is allocated on measured latency at widths the kernels
    # prefer (see onnxforge.passes.prune.latency); a ratio cut to odd widths can be slower than no cut.
    add("prune-channels", {"target_latency": Range(0.5, 0.9, 0.1), "criterion": Choice(tuple(criteria))},
        optional=True)
    add("reconstruct", {}, optional=True, requires="prune-channels", needs_data=True)
    # Not ``distill``: minutes of torch training per candidate on a 224x224 CNN, and it did not win on
    # the trained suite (BENCHMARKS.md, Pruning run 5); opt in with a space file (README, ``tune``).
    # GPTQ rounding: on the trained YOLOX detector it let the budget keep 8 convs float instead of 52
    # (CPU-time ratio 0.56 vs 0.87, BENCHMARKS.md Tune run 4). Not latency_guard: it kept every int8
    # region there and costs interleaved timing per candidate; opt in with a space file.
    # sqnr + bias correction is O3's int8 (EfficientNet-Lite0's top-1 agreement: percentile 0.906,
    # sqnr 0.938, sqnr + bias correction 0.969 on 32 held-out crops; BENCHMARKS.md, Quantization run 4).
    int8: dict[str, Any] = {"calibration": Choice(("sqnr", "minmax", "percentile", "entropy")),
                            "bias_correction": Choice((True, False)),
                            "per_channel": Choice((True, False)), "weight_rounding": Choice(("nearest", "gptq"))}
    add("quantize-int8", int8, exclusive="quantize", needs_data=True)
    if max_drop is not None:
        from onnxforge.tune.budget import pass_budget

        # mixed precision: the pass keeps float the cheapest nodes whose drop in tune's metric holds
        # --max-drop at 90 % confidence on the search data (onnxforge.tune.budget)
        add("quantize-int8", {**int8, **pass_budget(max_drop)}, exclusive="quantize", needs_data=True,
            label="mixed-int8")
        # O3's int8 exactly as the preset builds it (its proxy budget and latency guard), judged by
        # tune's metric like any candidate: tune's answer is never worse than the preset's where the
        # preset fits --max-drop (the trained YOLOX on an AMD EPYC: O3 2.05x at -0.7 points held out,
        # the mixed-int8 slot's 90 % bound on tune's metric 1.84x; BENCHMARKS.md, Tune run 6)
        add("quantize-int8", {**_preset_int8("O3"), "budget_measure": "proxy"}, exclusive="quantize",
            needs_data=True, label="o3-int8")
    add("quantize-dynamic", {}, exclusive="quantize")
    space.first_candidates = _o3_int8_candidates(space)
    return space


# O3's int8 options; on the trained YOLOX detector, 200 search images, the default space's 8-trial
# budget never drew them (it drew minmax all-int8, -3.1 points, and pruned stacks) while this
# candidate with a budget was 1.54-1.78x within 1 point on unseen images (BENCHMARKS.md, Tune run 5).
_O3_INT8 = {"calibration": "sqnr", "bias_correction": True, "per_channel": True, "weight_rounding": "nearest"}


def _preset_int8(preset: str) -> dict[str, Any]:
    """The options of the preset's ``quantize-int8`` (the preset string stays their one source)."""
    from onnxforge.passes.spec import PRESETS, parse_pipeline

    return dict(next(s.options for s in parse_pipeline(PRESETS[preset]) if s.name == "quantize-int8"))


def _o3_int8_candidates(space: Space) -> list[dict[str, Any]]:
    """The default space's first candidates: O3's int8 options alone after the base, all-int8 and
    (given a budget) mixed precision, then O3's int8 as the preset builds it (``fuse`` on, as in
    the preset), so that tune starts from what the preset would build."""
    off = {s.key: False for s in space.slots if s.optional and not s.exclusive and not s.requires}
    out = []
    for slot in (s for s in space.slots if s.name == "quantize-int8" and s.exclusive):
        searched = slot.searched()
        fuse = {"fuse": True} if slot.key == "o3-int8" and "fuse" in off else {}
        out.append({f"exclusive:{slot.exclusive}": slot.key, **off, **fuse,
                    **{f"{slot.key}.{k}": v for k, v in _O3_INT8.items()
                       if k in searched and v in searched[k].values}})
    return out


# --------------------------------------------------------------------------------- file form

_SLOT_KEYS = {"pass", "optional", "exclusive", "requires", "options", "label"}
_TOP_KEYS = {"base", "space"}


def load_space(path: str | pathlib.Path) -> Space:
    """Read a space from a TOML file (top-level keys or a ``[tune]`` table); see the module docstring."""
    path = pathlib.Path(path)
    data = read_toml(path, "search space file")
    if "tune" in data and isinstance(data["tune"], dict):
        data = data["tune"]
    elif path.name == "pyproject.toml":
        data = data.get("tool", {}).get("onnxforge", {}).get("tune", {})
    return space_from_dict(data, where=str(path))


def space_from_dict(data: dict[str, Any], where: str = "space") -> Space:
    from onnxforge.passes.registry import coerce_option, get_pass_class, _type_hints
    from onnxforge.passes.base import option_specs
    from onnxforge.passes.spec import PRESETS, parse_pipeline

    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PipelineSpecError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    base = data.get("base", "")
    if not isinstance(base, str):
        raise PipelineSpecError(f"{where}: 'base' must be a pipeline string or a preset name")
    base = PRESETS.get(base, base)
    if base:
        for spec in parse_pipeline(base):
            get_pass_class(spec.name)
    entries = data.get("space", [])
    if not isinstance(entries, list) or not entries:
        raise PipelineSpecError(f"{where}: needs a [[space]] list with at least one pass")
    space = Space(base=base)
    names: list[str] = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "pass" not in entry:
            raise PipelineSpecError(f"{where}: [[space]] entry {n} needs 'pass = \"name\"'")
        bad = set(entry) - _SLOT_KEYS
        if bad:
            raise PipelineSpecError(f"{where}: [[space]] entry {n} ({entry['pass']}): unknown key(s) {sorted(bad)}")
        name = str(entry["pass"])
        cls = get_pass_class(name)
        specs = option_specs(cls)
        hints = _type_hints(cls)
        options: dict[str, Any] = {}
        for key, raw in (entry.get("options") or {}).items():
            if key not in specs:
                raise PipelineSpecError(
                    f"{where}: pass {name!r} has no option {key!r} (options: {', '.join(specs) or 'none'})"
                )
            ann = hints.get(key, specs[key].annotation)
            options[key] = _parse_dim(name, key, raw, ann, where, coerce_option)
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not label or "." in label or ":" in label):
            raise PipelineSpecError(f"{where}: [[space]] entry {n} ({name}): label must be a name without '.' or ':'")
        key = label or name
        if key in names:
            raise PipelineSpecError(f"{where}: [[space]] entry {n}: {key!r} fills two slots; "
                                    f"give one a label = \"...\" of its own")
        requires = entry.get("requires")
        if requires is not None and requires not in names:
            raise PipelineSpecError(f"{where}: {key} requires {requires!r}, which is not an earlier [[space]] "
                                    f"pass or label")
        names.append(key)
        space.slots.append(Slot(name, options, optional=bool(entry.get("optional", False)),
                                exclusive=entry.get("exclusive"), requires=requires, label=label))
    return space


def _parse_dim(name: str, key: str, raw: Any, ann: Any, where: str, coerce) -> Any:
    if isinstance(raw, dict):
        bad = set(raw) - {"low", "high", "step"}
        if bad or "low" not in raw or "high" not in raw:
            raise PipelineSpecError(f"{where}: {name}.{key}: a range is {{low = ..., high = ..., step = ...}}")
        low, high, step = raw["low"], raw["high"], raw.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise PipelineSpecError(f"{where}: {name}.{key}: range bounds must be numbers")
        if high < low:
            raise PipelineSpecError(f"{where}: {name}.{key}: high < low")
        integer = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
        for bound in (low, high):
            coerce(name, key, bound, ann)  # the pass must accept the bounds
        return Range(float(low), float(high), float(step) if step is not None else None, integer)
    origin = typing.get_origin(ann)
    list_typed = origin in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(ann))
    if isinstance(raw, list) and list_typed and not any(isinstance(v, list) for v in raw):
        return coerce(name, key, raw, ann)  # a list-valued option given one value; choices are [[..], [..]]
    if isinstance(raw, list):
        if not raw:
            raise PipelineSpecError(f"{where}: {name}.{key}: empty list of choices")
        # TOML has no null: "none" is the pass's default for an optional option (max_drop = ["none", 0.5])
        optional = type(None) in typing.get_args(ann)
        values = tuple(None if optional and v == "none" else coerce(name, key, v, ann) for v in raw)
        return Choice(values) if len(values) > 1 else values[0]
    return coerce(name, key, raw, ann)
