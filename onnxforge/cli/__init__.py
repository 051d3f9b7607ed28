"""The ``onnxforge`` command line.

Each command family lives in its own module under ``onnxforge/cli/`` and attaches itself to
:data:`main` with ``@main.command()``. User mistakes (any :class:`~onnxforge.errors.OnnxforgeError`)
become one line on stderr and the error's exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from onnxforge.errors import OnnxforgeError

_COMMAND_MODULES = [
    "onnxforge.cli.optimize_cmd",
    "onnxforge.cli.inspect_cmd",
    "onnxforge.cli.runtime_cmds",
    "onnxforge.cli.tune_cmd",
    "onnxforge.cli.distill_cmd",
    "onnxforge.cli.split_cmd",
]


class _Group(click.Group):
    """Click group that turns OnnxforgeError into one clear line and a non-zero exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OnnxforgeError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"onnxforge: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("onnxforge: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE (dotted name or .py file) so the passes it registers can be used. Repeatable.",
)
@click.version_option(package_name="onnxforge")
@click.pass_context
def main(ctx: click.Context, debug: bool, plugins: tuple[str, ...]) -> None:
    """onnxforge: fold, fuse, prune and quantize ONNX models, and report what it cost."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    from onnxforge.passes.registry import load_plugin

    for module in plugins:
        try:
            load_plugin(module)
        except OnnxforgeError as e:
            if debug:
                raise
            click.echo(f"onnxforge: error: {e}", err=True)
            sys.exit(e.exit_code)


for _module in _COMMAND_MODULES:
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)
