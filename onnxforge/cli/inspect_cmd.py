"""``onnxforge inspect``: what is in a model."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from onnxforge.cli import main


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model: pathlib.Path, as_json: bool) -> None:
    """Summarize MODEL: opsets, inputs/outputs, op histogram, parameters, bytes, estimated FLOPs."""
    from onnxforge.ir.io import load
    from onnxforge.ir.summary import summarize

    summary = summarize(load(model), path=model)
    if as_json:
        json.dump(summary.to_dict(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    from rich.console import Console

    summary.render(Console())
