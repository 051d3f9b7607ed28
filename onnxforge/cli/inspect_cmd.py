"""``onnxforge inspect``: what is in a model."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from onnxforge.cli import main
from onnxforge.errors import OnnxforgeError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Size of a symbolic input dimension, e.g. --dim height=320 --dim width=320 (repeatable): "
                   "FLOPs and shapes are computed at those sizes; dims left symbolic count as 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model: pathlib.Path, dims: tuple[str, ...], as_json: bool) -> None:
    """Summarize MODEL: opsets, inputs/outputs, op histogram, parameters, bytes, estimated FLOPs."""
    from onnxforge.cli._console import console
    from onnxforge.cli.runtime_cmds import _parse_dims
    from onnxforge.ir.io import load
    from onnxforge.ir.summary import summarize

    dim_values = _parse_dims(dims)
    try:
        summary = summarize(load(model), path=model, dim_values=dim_values)
    except ValueError as e:
        raise OnnxforgeError(f"--dim: {e}") from None
    if as_json:
        json.dump(summary.to_dict(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    summary.render(console())
