"""Calibration data: a re-iterable, sized sequence of feed dicts (``{input name: array}``).

Sources: an ``.npz`` of named arrays whose leading axis is the sample axis (``from_npz``), a folder
with one ``.npz``/``.npy`` per sample (``from_dir``), any Python iterable of feed dicts
(``from_iterable``), or random data drawn from the input shapes (``synthetic``, with a loud warning:
quantization ranges and pruning importance computed from it are not representative).

When a model is given, every sample is checked against its inputs (names, rank, fixed dims,
dtype): a mismatch is a :class:`~onnxforge.errors.CalibrationDataError` naming the input. Symbolic
dims accept any size, so samples may differ in sequence length.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.runtime._model import InputSpec, ModelLike, check_feeds, check_input_names, input_specs

Feeds = dict[str, np.ndarray]


# The array of a calibration .npz that holds the samples' true labels for a task metric, not a model input.
LABELS = "labels"


class SyntheticDataWarning(UserWarning):
    """Calibration is running on random data: results are not representative of real inputs."""


class CalibrationData:
    """A re-iterable, indexable sequence of feed dicts.

    Iterating twice yields the same samples (files are re-read, arrays re-sliced; nothing is
    consumed). ``len(data)`` is the number of feeds (batches), ``data[i]`` one feed,
    ``data.take(n)`` the first ``n`` feeds.

    Labels: an array named ``labels`` next to the inputs (leading axis = samples; not a model input)
    is kept aside, never fed to the model: ``data.label_of(i)`` is feed ``i``'s labels, the samples
    of that feed. A task metric (``optimize --metric``) reads them as ``data["labels"]``, so its
    budget can count accuracy against the truth instead of agreement with the float model.
    """

    def __init__(
        self,
        length: int,
        get: Callable[[int], Mapping[str, Any]],
        *,
        specs: Mapping[str, InputSpec] | None = None,
        source: str = "",
        synthetic: bool = False,
        label_of: Callable[[int], np.ndarray] | None = None,
    ):
        self._length = int(length)
        self._get = get
        self.specs = dict(specs) if specs is not None else None
        self.source = source
        self.synthetic = synthetic
        self._label_of = label_of

    @property
    def has_labels(self) -> bool:
        return self._label_of is not None

    def label_of(self, index: int) -> np.ndarray:
        """The labels of feed ``index`` (its samples, leading axis kept)."""
        if self._label_of is None:
            raise CalibrationDataError(f"calibration data{' from ' + self.source if self.source else ''} has no "
                                       "'labels' array")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"calibration sample {index} out of range (0..{self._length - 1})")
        return self._label_of(index)

    # --- sequence protocol --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Feeds:
        if isinstance(index, slice):
            indices = range(self._length)[index]
            label_of = None if self._label_of is None else (lambda i: self._label_of(indices[i]))
            return CalibrationData(
                len(indices), lambda i: self._get(indices[i]), specs=self.specs, source=self.source,
                synthetic=self.synthetic, label_of=label_of,
            )  # type: ignore[return-value]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"calibration sample {index} out of range (0..{self._length - 1})")
        feeds = self._get(index)
        where = f"calibration sample {index}" + (f" of {self.source}" if self.source else "")
        if self.specs is not None:
            return check_feeds(feeds, self.specs, where=where)
        if not isinstance(feeds, Mapping):
            raise CalibrationDataError(f"{where}: expected a dict of input name -> array, got {type(feeds).__name__}")
        return {str(k): np.asarray(v) for k, v in feeds.items()}

    def __iter__(self) -> Iterator[Feeds]:
        for i in range(self._length):
            yield self[i]

    def __repr__(self) -> str:
        kind = "synthetic " if self.synthetic else ""
        return f"CalibrationData({kind}{self._length} feeds{', ' + self.source if self.source else ''})"

    def take(self, n: int | None) -> CalibrationData:
        """The first ``n`` feeds (all of them when ``n`` is None or larger than the data)."""
        if n is None or n >= self._length:
            return self
        if n < 0:
            raise ValueError(f"take(n) needs n >= 0, got {n}")
        return self[:n]  # type: ignore[return-value]

    def with_model(self, model: ModelLike) -> CalibrationData:
        """The same samples, validated against ``model``'s inputs (checks the first one now)."""
        data = CalibrationData(
            self._length, self._get, specs=input_specs(model), source=self.source, synthetic=self.synthetic,
            label_of=self._label_of,
        )
        data.validate()
        return data

    def validate(self, n: int = 1) -> None:
        """Check the first ``n`` samples now (all are checked lazily as they are read)."""
        if self._length == 0:
            raise CalibrationDataError(f"calibration data{' from ' + self.source if self.source else ''} is empty")
        for i in range(min(n, self._length)):
            self[i]

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        model: ModelLike | None = None,
        *,
        batch_size: int = 1,
        drop_last: bool = False,
        source: str = "arrays",
    ) -> CalibrationData:
        """Named arrays whose leading axis is the sample axis, cut into feeds of ``batch_size``.

        If an array has one axis more than the model input (the model has no batch axis),
        samples are taken one by one without keeping the leading axis (``batch_size`` must be 1).
        An array named ``labels`` that is not a model input is kept aside (class docstring).
        """
        if batch_size < 1:
            raise CalibrationDataError(f"batch_size must be >= 1, got {batch_size}")
        arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        specs = input_specs(model) if model is not None else None
        labels = arrays.pop(LABELS) if LABELS in arrays and (specs is None or LABELS not in specs) else None
        if not arrays:
            raise CalibrationDataError(f"{source}: no arrays")
        if specs is not None:
            check_input_names(arrays.keys(), specs, source)
        lengths = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
        if None in lengths.values():
            scalars = [n for n, l in lengths.items() if l is None]
            raise CalibrationDataError(f"{source}: arrays {scalars} are 0-d; the leading axis must be the sample axis")
        if len(set(lengths.values())) != 1:
            raise CalibrationDataError(
                f"{source}: arrays disagree on the number of samples (leading axis): {lengths}"
            )
        n_samples = next(iter(lengths.values()))
        if labels is not None and (labels.ndim == 0 or len(labels) != n_samples):
            raise CalibrationDataError(f"{source}: 'labels' has {labels.shape[0] if labels.ndim else 0} entries, "
                                       f"the inputs {n_samples} samples (leading axis)")
        squeeze = set()
        if specs is not None:
            for name, a in arrays.items():
                shape = specs[name].shape
                if shape is not None and a.ndim == len(shape) + 1:
                    squeeze.add(name)
            if squeeze and batch_size != 1:
                raise CalibrationDataError(
                    f"{source}: inputs {sorted(squeeze)} have no batch axis in the model, so batch_size must be 1"
                )
        n_feeds = n_samples // batch_size if drop_last else -(-n_samples // batch_size)

        def get(i: int) -> Feeds:
            lo = i * batch_size
            return {
                name: (a[lo] if name in squeeze else a[lo : lo + batch_size]) for name, a in arrays.items()
            }

        def label_of(i: int) -> np.ndarray:
            lo = i * batch_size
            return labels[lo : lo + batch_size]

        data = cls(n_feeds, get, specs=specs, source=source, label_of=None if labels is None else label_of)
        if specs is not None:
            data.validate()
        return data

    @classmethod
    def from_npz(
        cls, path: str | os.PathLike, model: ModelLike | None = None, *, batch_size: int = 1, drop_last: bool = False
    ) -> CalibrationData:
        """An ``.npz`` of arrays keyed by input names; leading axis = samples."""
        path = Path(path)
        arrays = read_npz(path, "calibration file")
        return cls.from_arrays(arrays, model, batch_size=batch_size, drop_last=drop_last, source=str(path))

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike, model: ModelLike | None = None, *, input_name: str | None = None
    ) -> CalibrationData:
        """A folder with one sample per file, in natural file-name order.

        ``.npz`` files hold one array per input name (and ``labels``, kept aside, if the first file
        has it); an ``.npy`` file holds the single input of a one-input model (name taken from
        ``model`` or ``input_name``). If an array has one axis less
        than the model input, a batch axis of 1 is added.
        """
        path = Path(path)
        if not path.is_dir():
            raise CalibrationDataError(f"calibration folder not found: {path}")
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix in (".npz", ".npy")),
            key=lambda p: _natural_key(p.name),
        )
        if not files:
            raise CalibrationDataError(f"{path}: no .npz or .npy files")
        specs = input_specs(model) if model is not None else None
        single = input_name
        if any(p.suffix == ".npy" for p in files) and single is None:
            required = [n for n, s in (specs or {}).items() if not s.optional]
            if specs is None:
                raise CalibrationDataError(
                    f"{path}: .npy files need the model (or input_name=) to know which input they feed"
                )
            if len(required) != 1:
                raise CalibrationDataError(
                    f"{path}: .npy files can only feed a one-input model; this model has inputs {required} "
                    "(use one .npz per sample with an array per input)"
                )
            single = required[0]

        def read(file: Path) -> dict[str, np.ndarray]:
            try:
                if file.suffix == ".npy":
                    return {single: np.load(file, allow_pickle=False)}
                with np.load(file, allow_pickle=False) as npz:
                    return {name: npz[name] for name in npz.files}
            except Exception as exc:
                raise CalibrationDataError(f"cannot read calibration file {file}: {exc}") from exc

        # a 'labels' array in the sample files (not a model input): kept aside like from_arrays does
        labelled = (files[0].suffix == ".npz" and (specs is None or LABELS not in specs)
                    and LABELS in read(files[0]))

        def label_of(i: int) -> np.ndarray:
            arrays = read(files[i])
            if LABELS not in arrays:
                raise CalibrationDataError(f"{files[i]}: no 'labels' array (the first sample file has one)")
            return arrays[LABELS]

        def get(i: int) -> Feeds:
            feeds = read(files[i])
            if labelled:
                feeds.pop(LABELS, None)
            if specs is not None:
                check_input_names(feeds.keys(), specs, str(files[i]))
                for name, a in feeds.items():
                    shape = specs[name].shape
                    if shape is not None and a.ndim == len(shape) - 1:
                        feeds[name] = a[None]
            return feeds

        data = cls(len(files), get, specs=specs, source=str(path), label_of=label_of if labelled else None)
        if specs is not None:
            data.validate()
        return data

    @classmethod
    def from_iterable(cls, iterable: Iterable[Mapping[str, Any]], model: ModelLike | None = None) -> CalibrationData:
        """Feed dicts from a list, a generator, or any iterable.

        A sequence is used in place (re-indexed on every pass); a one-shot iterator (a generator) is
        read once into memory so that it can be iterated again.
        """
        if isinstance(iterable, CalibrationData):
            return iterable.with_model(model) if model is not None else iterable
        if isinstance(iterable, Mapping):
            raise CalibrationDataError(
                "from_iterable expects an iterable of feed dicts; for one dict of arrays with a sample "
                "axis use CalibrationData.from_arrays"
            )
        if hasattr(iterable, "__len__") and hasattr(iterable, "__getitem__"):
            items = iterable
        else:
            items = list(iterable)
        specs = input_specs(model) if model is not None else None
        data = cls(len(items), lambda i: items[i], specs=specs, source="iterable")  # type: ignore[index]
        if specs is not None:
            data.validate()
        return data

    @classmethod
    def synthetic(
        cls,
        model: ModelLike,
        n: int = 16,
        seed: int = 0,
        *,
        dim_values: Mapping[str, int] | None = None,
        batch_size: int | None = None,
        int_range: tuple[int, int] = (0, 10),
    ) -> CalibrationData:
        """``n`` random feeds drawn from the input shapes (warns: not representative).

        Floats ~ N(0, 1); integers uniform in ``int_range`` (token ids); booleans fair coins.
        Symbolic dims take ``dim_values[name]``, else ``batch_size`` for a symbolic first axis,
        else 1. Sample ``i`` is reproducible from ``(seed, i)``.
        """
        specs = input_specs(model)
        warnings.warn(
            "calibrating on SYNTHETIC random data drawn from the input shapes: quantization ranges, "
            "pruning importance and accuracy figures computed from it are NOT representative of real "
            "inputs; pass real calibration data (.npz, a folder, or an iterable of feeds)",
            SyntheticDataWarning,
            stacklevel=2,
        )
        shapes = feed_shapes(specs, dim_values=dim_values, batch_size=batch_size)

        def get(i: int) -> Feeds:
            return random_feeds(specs, seed=(seed, i), shapes=shapes, int_range=int_range)

        return cls(n, get, specs=specs, source="synthetic", synthetic=True)


def feed_shapes(
    specs: Mapping[str, InputSpec],
    *,
    dim_values: Mapping[str, int] | None = None,
    batch_size: int | None = None,
    default_dim: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the required inputs: symbolic dims take ``dim_values[name]``, else
    ``batch_size`` on axis 0, else ``default_dim``. A fixed first axis that differs from
    ``batch_size`` is a :class:`CalibrationDataError`."""
    shapes = {}
    for name, spec in specs.items():
        if spec.optional:
            continue
        if spec.shape is None:
            raise CalibrationDataError(f"input {name!r} has no shape in the model; give real feeds")
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d >= 0:
                if axis == 0 and batch_size is not None and d != batch_size:
                    raise CalibrationDataError(
                        f"input {name!r} has a fixed batch axis of {d}; batch_size={batch_size} is not possible"
                    )
                shape.append(d)
            elif isinstance(d, str) and dim_values and d in dim_values:
                shape.append(int(dim_values[d]))
            elif axis == 0 and batch_size is not None:
                shape.append(int(batch_size))
            else:
                shape.append(default_dim)
        shapes[name] = tuple(shape)
    return shapes


def random_feeds(
    specs: Mapping[str, InputSpec],
    *,
    seed: int | tuple[int, ...] = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    int_range: tuple[int, int] = (0, 10),
    **shape_kwargs: Any,
) -> Feeds:
    """One random feed dict for the required inputs (floats ~ N(0, 1), ints in ``int_range``,
    bools fair coins). ``shapes`` defaults to :func:`feed_shapes` with ``shape_kwargs``."""
    if shapes is None:
        shapes = feed_shapes(specs, **shape_kwargs)
    rng = np.random.default_rng(list(seed) if isinstance(seed, tuple) else seed)
    feeds = {}
    for name, shape in shapes.items():
        dtype = specs[name].dtype if specs[name].dtype is not None else np.dtype(np.float32)
        if dtype == np.bool_:
            feeds[name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(int_range[0], int_range[1], size=shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise CalibrationDataError(f"cannot draw random data for input {name!r} of type {dtype}")
    return feeds


DataSource = Union[CalibrationData, str, os.PathLike, Iterable[Mapping[str, Any]], Mapping[str, np.ndarray], None]


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickles), or a CalibrationDataError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{what} not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as exc:
        raise CalibrationDataError(f"cannot read {path} as .npz: {exc}") from exc


def load(
    source: DataSource, model: ModelLike | None = None, *, batch_size: int = 1, n: int | None = None
) -> CalibrationData:
    """Calibration data from whatever the user gave.

    - :class:`CalibrationData`: validated against ``model``;
    - a path to an ``.npz`` file (:meth:`CalibrationData.from_npz`) or a folder
      (:meth:`CalibrationData.from_dir`);
    - ``"synthetic"`` or ``"synthetic:N"``: random data (warns), ``N`` (or ``n``, default 16) feeds;
    - a dict of arrays with a sample axis (:meth:`CalibrationData.from_arrays`);
    - any other iterable of feed dicts (:meth:`CalibrationData.from_iterable`).

    ``n`` limits the number of feeds.
    """
    if source is None:
        raise CalibrationDataError(
            "no calibration data: give an .npz of arrays named like the model inputs, a folder of "
            ".npz/.npy samples, an iterable of feed dicts, or 'synthetic' (not representative)"
        )
    if isinstance(source, CalibrationData):
        data = source.with_model(model) if model is not None else source
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        match = re.fullmatch(r"synthetic(?::(\d+))?", text) if isinstance(text, str) else None
        if match:
            if model is None:
                raise CalibrationDataError("synthetic calibration data needs the model (to read input shapes)")
            count = int(match.group(1)) if match.group(1) else (n or 16)
            data = CalibrationData.synthetic(model, count, batch_size=batch_size if batch_size != 1 else None)
        else:
            path = Path(text)
            if path.is_dir():
                data = CalibrationData.from_dir(path, model)
            elif path.is_file() and path.suffix == ".npz":
                data = CalibrationData.from_npz(path, model, batch_size=batch_size)
            elif path.exists():
                raise CalibrationDataError(
                    f"{path}: calibration data must be an .npz file or a folder of .npz/.npy files"
                )
            else:
                raise CalibrationDataError(f"calibration data not found: {path}")
    elif isinstance(source, Mapping):
        data = CalibrationData.from_arrays(source, model, batch_size=batch_size)
    elif isinstance(source, Iterable):
        data = CalibrationData.from_iterable(source, model)
    else:
        raise CalibrationDataError(f"cannot use a {type(source).__name__} as calibration data")
    return data.take(n) if n is not None else data


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]
