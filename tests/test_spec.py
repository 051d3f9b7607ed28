"""Pipeline text and TOML forms, presets, and their errors."""

import pytest

from onnxforge.errors import PipelineSpecError
from onnxforge.passes.spec import (
    PRESETS,
    PassSpec,
    PipelineConfig,
    config_to_toml,
    format_pipeline,
    load_config,
    parse_pipeline,
)


def test_parse_names_and_typed_options():
    specs = parse_pipeline('fold-constants, prune-channels(ratio=0.3,criterion=l1,round_to=8,global=true),'
                           'quantize-int8(exclude=[Softmax,"/head/Gemm"],percentile=99.9,x=none)')
    assert specs == [
        PassSpec("fold-constants"),
        PassSpec("prune-channels", {"ratio": 0.3, "criterion": "l1", "round_to": 8, "global": True}),
        PassSpec("quantize-int8", {"exclude": ["Softmax", "/head/Gemm"], "percentile": 99.9, "x": None}),
    ]


def test_preset_options_set_the_passes_that_have_them():
    """O3(...) moves O3's balance without copying its pass list: the options go to quantize-int8,
    every other pass and option stays as the preset has it."""
    plain = parse_pipeline("O3")
    specs = parse_pipeline("O3(budget_unit=agreement,score_gate=none,max_drop=0.005),extra")
    assert [s.name for s in specs] == [s.name for s in plain] + ["extra"]
    q, q0 = specs[len(plain) - 1], plain[-1]
    assert q.name == "quantize-int8"
    assert q.options == {**q0.options, "budget_unit": "agreement", "score_gate": None, "max_drop": 0.005}
    assert specs[: len(plain) - 1] == plain[:-1]
    assert parse_pipeline("O3") == plain  # the preset itself is not changed
    from onnxforge.passes.registry import create_pass

    p = create_pass(q.name, q.options)
    assert (p.budget_unit, p.score_gate, p.max_drop) == ("agreement", None, 0.005)


@pytest.mark.parametrize(
    "text",
    [
        "a,b(x=1,y=[1,2.5,c]),c(s=\"with space, and comma\")",
        "prune-channels(ratio=0.3,criterion=l1)",
        'q(exclude=["a b",c],flag=false)',
    ],
)
def test_round_trip(text):
    specs = parse_pipeline(text)
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_preset_expands():
    specs = parse_pipeline("O1,extra")
    assert [s.name for s in specs] == [s.name for s in parse_pipeline(PRESETS["O1"])] + ["extra"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("a(", "expected ')'"),
        ("a(x)", "expected '='"),
        ("a,,b", "pass name"),
        ("a,", "trailing"),
        ("a(x=1,x=2)", "given twice"),
        ("O1(x=1)", "no pass of preset O1 has option 'x'"),
        ("O3(budget_unt=agreement)", "no pass of preset O3 has option 'budget_unt' (did you mean 'budget_unit'?"),
    ],
)
def test_parse_errors(text, fragment):
    with pytest.raises(PipelineSpecError, match="pipeline") as e:
        parse_pipeline(text)
    assert fragment in str(e.value)


def test_toml_config(tmp_path):
    cfg = tmp_path / "onnxforge.toml"
    cfg.write_text(
        'target = "onnx"\npreset = "O1"\ncalibration_data = "calib.npz"\nverify = true\n\n'
        '[[passes]]\nname = "prune-channels"\nratio = 0.25\ncriterion = "l2"\n'
    )
    config = load_config(cfg)
    assert config.target == "onnx"
    assert config.verify is True
    assert config.calibration_data == str(tmp_path / "calib.npz")
    assert config.passes[-1] == PassSpec("prune-channels", {"ratio": 0.25, "criterion": "l2"})
    assert len(config.passes) == len(parse_pipeline(PRESETS["O1"])) + 1


def test_pyproject_table(tmp_path):
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text('[project]\nname="x"\n\n[tool.onnxforge]\npasses = "fold-constants,cse"\n')
    assert [s.name for s in load_config(cfg).passes] == ["fold-constants", "cse"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("nonsense = 1\npreset='O1'", "unknown key"),
        ("preset = 'O9'", "unknown preset"),
        ("verify = 'yes'\npreset='O1'", "'verify' must be bool"),
        ("[[passes]]\nratio = 1", "needs a 'name'"),
        ("target = 'cpu'", "no passes"),
        ("preset = ", "invalid TOML"),
        ("preset = 'O1'\nproviders = 'cuda'", "'providers' must be list"),
        ("preset = 'O1'\nproviders = ['gpu']", "'providers': unknown execution provider 'gpu'"),
        ("preset = 'O1'\nproviders = []", "'providers' is empty"),
    ],
)
def test_toml_errors(tmp_path, body, fragment):
    cfg = tmp_path / "onnxforge.toml"
    cfg.write_text(body)
    with pytest.raises(PipelineSpecError) as e:
        load_config(cfg)
    assert fragment in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(PipelineSpecError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_config_written_back_reads_the_same(tmp_path):
    config = PipelineConfig(
        passes=parse_pipeline("fold-constants,prune-channels(ratio=0.5,criterion=l1,protect=[a,b])"),
        target="cpu",
        verify=True,
        seed=3,
        num_samples=32,
        providers=["cuda", "cpu"],
        metric="my_metrics:f1",
    )
    path = tmp_path / "saved.toml"
    path.write_text(config_to_toml(config))
    again = load_config(path)
    assert again.passes == config.passes
    assert (again.verify, again.seed, again.target, again.num_samples) == (True, 3, "cpu", 32)
    assert again.providers == ["cuda", "cpu"]
    assert again.metric == "my_metrics:f1"


def test_config_providers_reach_the_passes(tmp_path):
    """Regression: 'providers' was parsed, then dropped: passes that measure ran on the default."""
    from onnxforge.passes.manager import Pipeline

    cfg = tmp_path / "onnxforge.toml"
    cfg.write_text('preset = "O1"\nseed = 5\nnum_samples = 8\nproviders = ["cuda", "cpu"]\n')
    config = load_config(cfg)
    context = config.context()
    assert context.providers == ("cuda", "cpu") and context.seed == 5
    assert context.options == {"num_samples": 8}
    pipeline = Pipeline.from_config(config)
    assert pipeline.context.providers == ("cuda", "cpu")
    assert all(p.context.providers == ("cuda", "cpu") for p in pipeline.passes if hasattr(p, "context"))
    assert PipelineConfig(passes=parse_pipeline("cse")).context().providers == ("cpu",)
