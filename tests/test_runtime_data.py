"""CalibrationData: npz, folder, iterable, synthetic, the dispatcher, and mismatch errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.errors import CalibrationDataError
from onnxforge.runtime.data import CalibrationData, SyntheticDataWarning, load


def image_model() -> onnx.ModelProto:
    """One float input [batch, 3, 4, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["y"])], "img",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def text_model() -> onnx.ModelProto:
    """Two inputs with symbolic batch and sequence: ids int64 [batch, seq], mask bool [batch, seq]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"]), helper.make_node("Not", ["mask"], ["nmask"])], "txt",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("nmask", TensorProto.BOOL, ["batch", "seq"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_from_npz_batches_the_sample_axis(tmp_path):
    images = np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    np.savez(tmp_path / "calib.npz", image=images)
    data = CalibrationData.from_npz(tmp_path / "calib.npz", image_model())
    assert len(data) == 5
    feeds = list(data)
    assert [f["image"].shape for f in feeds] == [(1, 3, 4, 4)] * 5
    np.testing.assert_array_equal(feeds[3]["image"][0], images[3])
    # re-iterable: a second pass gives the same samples
    np.testing.assert_array_equal(list(data)[3]["image"], feeds[3]["image"])

    batched = CalibrationData.from_npz(tmp_path / "calib.npz", image_model(), batch_size=2)
    assert len(batched) == 3
    assert [f["image"].shape[0] for f in batched] == [2, 2, 1]
    assert len(CalibrationData.from_npz(tmp_path / "calib.npz", image_model(), batch_size=2, drop_last=True)) == 2


def test_from_npz_name_mismatch(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(CalibrationDataError, match=r"missing input\(s\) \['image'\] and unknown input\(s\) \['pixels'\]"):
        CalibrationData.from_npz(tmp_path / "bad.npz", image_model())
    np.savez(tmp_path / "shape.npz", image=np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(CalibrationDataError, match="axis 2 must be 4"):
        CalibrationData.from_npz(tmp_path / "shape.npz", image_model())
    np.savez(tmp_path / "count.npz", ids=np.zeros((3, 7), np.int64), mask=np.zeros((2, 7), bool))
    with pytest.raises(CalibrationDataError, match="disagree on the number of samples"):
        CalibrationData.from_npz(tmp_path / "count.npz", text_model())
    with pytest.raises(CalibrationDataError, match="not found"):
        CalibrationData.from_npz(tmp_path / "missing.npz")


def test_from_dir_npy_and_npz(tmp_path):
    for i in range(12):  # natural order: 2 before 10
        np.save(tmp_path / f"sample_{i}.npy", np.full((3, 4, 4), i, np.float32))  # no batch axis: added
    data = CalibrationData.from_dir(tmp_path, image_model())
    assert len(data) == 12
    assert [int(f["image"][0, 0, 0, 0]) for f in data] == list(range(12))
    assert data[0]["image"].shape == (1, 3, 4, 4)

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i, seq in enumerate([3, 5, 8]):  # variable sequence lengths are fine: seq is symbolic
        np.savez(text_dir / f"{i}.npz", ids=np.arange(seq)[None], mask=np.ones((1, seq), bool))
    text = CalibrationData.from_dir(text_dir, text_model())
    assert [f["ids"].shape for f in text] == [(1, 3), (1, 5), (1, 8)]

    with pytest.raises(CalibrationDataError, match="one-input model"):
        CalibrationData.from_dir(tmp_path, text_model())
    (text_dir / "9.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationDataError, match="cannot read calibration file"):
        list(CalibrationData.from_dir(text_dir, text_model()))


def test_from_iterable_list_and_generator():
    samples = [{"ids": np.arange(n)[None], "mask": np.ones((1, n), bool)} for n in (2, 4)]
    data = CalibrationData.from_iterable(samples, text_model())
    assert len(data) == 2 and [f["ids"].shape[1] for f in data] == [2, 4]

    gen = ({"ids": np.zeros((1, 3), np.int64), "mask": np.ones((1, 3), bool)} for _ in range(3))
    data = CalibrationData.from_iterable(gen, text_model())
    assert len(data) == 3 and len(list(data)) == 3 and len(list(data)) == 3  # a generator is kept

    with pytest.raises(CalibrationDataError, match=r"missing input\(s\) \['mask'\]"):
        CalibrationData.from_iterable([{"ids": np.zeros((1, 3), np.int64)}], text_model())
    bad = CalibrationData.from_iterable(samples + [{"ids": np.zeros((1, 3), np.float32), "mask": np.ones((1, 3), bool)}])
    with pytest.raises(CalibrationDataError, match="'ids' expects int64, got float32"):
        list(bad.with_model(text_model()))


def test_take_and_slicing():
    data = CalibrationData.from_iterable([{"image": np.full((1, 3, 4, 4), i, np.float32)} for i in range(10)])
    assert len(data.take(3)) == 3 and len(data.take(None)) == 10 and len(data.take(100)) == 10
    assert [int(f["image"].flat[0]) for f in data.take(3)] == [0, 1, 2]
    assert int(data[-1]["image"].flat[0]) == 9
    with pytest.raises(IndexError):
        data[10]


def test_synthetic_warns_and_follows_shapes():
    with pytest.warns(SyntheticDataWarning, match="NOT representative"):
        data = CalibrationData.synthetic(text_model(), n=4, seed=1, dim_values={"seq": 6})
    assert len(data) == 4 and data.synthetic
    first = data[0]
    assert first["ids"].shape == (1, 6) and first["ids"].dtype == np.int64 and first["mask"].dtype == np.bool_
    with pytest.warns(SyntheticDataWarning):
        again = CalibrationData.synthetic(text_model(), n=4, seed=1, dim_values={"seq": 6})
    np.testing.assert_array_equal(again[2]["ids"], data[2]["ids"])  # deterministic
    with pytest.warns(SyntheticDataWarning):
        img = CalibrationData.synthetic(image_model(), n=2, batch_size=3)
    assert img[0]["image"].shape == (3, 3, 4, 4) and img[0]["image"].dtype == np.float32


def test_load_dispatches(tmp_path):
    np.savez(tmp_path / "c.npz", image=np.zeros((4, 3, 4, 4), np.float32))
    assert len(load(str(tmp_path / "c.npz"), image_model())) == 4
    assert len(load(tmp_path / "c.npz", image_model(), batch_size=4)) == 1
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "0.npy", np.zeros((1, 3, 4, 4), np.float32))
    assert len(load(tmp_path / "d", image_model())) == 1
    assert len(load([{"image": np.zeros((1, 3, 4, 4), np.float32)}], image_model())) == 1
    assert len(load({"image": np.zeros((6, 3, 4, 4), np.float32)}, image_model(), n=2)) == 2
    with pytest.warns(SyntheticDataWarning):
        assert len(load("synthetic:5", image_model())) == 5
    existing = CalibrationData.from_iterable([{"image": np.zeros((1, 3, 4, 4), np.float32)}])
    assert len(load(existing, image_model())) == 1
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        load(None, image_model())
    with pytest.raises(CalibrationDataError, match="not found"):
        load(tmp_path / "nope.npz", image_model())
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CalibrationDataError, match="must be an .npz"):
        load(tmp_path / "x.txt", image_model())


def test_npz_for_a_model_without_batch_axis(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["y"])], "nobatch",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "c.npz", image=np.random.default_rng(0).standard_normal((5, 3, 4, 4)))  # float64
    data = CalibrationData.from_npz(tmp_path / "c.npz", model)
    assert len(data) == 5
    assert data[0]["image"].shape == (3, 4, 4) and data[0]["image"].dtype == np.float32  # cast from float64
    with pytest.raises(CalibrationDataError, match="batch_size must be 1"):
        CalibrationData.from_npz(tmp_path / "c.npz", model, batch_size=2)


def test_labels_array_is_kept_aside_and_cut_like_the_feeds(tmp_path):
    """A 'labels' array next to the inputs is not fed to the model; label_of(i) is feed i's labels
    (slices and batches keep the pairing); a count that disagrees with the inputs is a clear error."""
    images = np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    np.savez(tmp_path / "calib.npz", image=images, labels=np.array([7, 8, 9, 10, 11]))
    data = CalibrationData.from_npz(tmp_path / "calib.npz", image_model())
    assert len(data) == 5 and set(data[0]) == {"image"} and data.has_labels
    assert data.label_of(3).tolist() == [10] and data.label_of(-1).tolist() == [11]
    assert data[1:4].label_of(0).tolist() == [8] and data.take(2).label_of(1).tolist() == [8]
    batched = CalibrationData.from_npz(tmp_path / "calib.npz", image_model(), batch_size=2)
    assert [batched.label_of(i).tolist() for i in range(3)] == [[7, 8], [9, 10], [11]]
    assert load(tmp_path / "calib.npz", image_model()).label_of(4).tolist() == [11]
    plain = CalibrationData.from_arrays({"image": images}, image_model())
    assert not plain.has_labels
    with pytest.raises(CalibrationDataError, match="no 'labels'"):
        plain.label_of(0)
    with pytest.raises(CalibrationDataError, match="'labels' has 4 entries"):
        CalibrationData.from_arrays({"image": images, "labels": np.arange(4)}, image_model())
    # a model whose input is named labels gets it as an input
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "labels"], ["y"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4]),
         helper.make_tensor_value_info("labels", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
    )
    fed = CalibrationData.from_arrays({"image": images, "labels": images}, helper.make_model(graph))
    assert set(fed[0]) == {"image", "labels"} and not fed.has_labels


def test_folder_of_samples_carries_labels(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", image=np.full((1, 3, 4, 4), i, np.float32), labels=np.array([10 + i]))
    data = CalibrationData.from_dir(tmp_path, image_model())
    assert data.has_labels and set(data[2]) == {"image"} and data.label_of(2).tolist() == [12]
    np.savez(tmp_path / "3.npz", image=np.zeros((1, 3, 4, 4), np.float32))  # one file without labels
    data = CalibrationData.from_dir(tmp_path, image_model())
    with pytest.raises(CalibrationDataError, match="no 'labels' array"):
        data.label_of(3)
