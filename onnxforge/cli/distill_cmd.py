"""``onnxforge distill``: recover a pruned student by knowledge distillation from its torch teacher."""

from __future__ import annotations

import pathlib

import click

from onnxforge.cli import main


@main.command()
@click.argument("student", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--teacher", required=True, metavar="MODULE:FACTORY",
              help="What builds the torch module the model was exported from: 'pkg.mod:fn' or 'file.py:fn'.")
@click.option("--state-dict", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="The teacher's trained weights (torch.save of state_dict(); loaded with weights_only=True).")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help=".npz: arrays named like the student's inputs (samples first) and optional integer labels.")
@click.option("--labels", "labels_key", metavar="KEY",
              help="Key of the labels in --data (default: 'labels', 'y' or 'y_train' if present).")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=5e-3, show_default=True, help="AdamW learning rate (cosine schedule).")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Softmax temperature of the KD term.")
@click.option("--alpha", type=float, default=0.7, show_default=True,
              help="Weight of the KD term; 1 - alpha goes to cross-entropy with the labels (if any).")
@click.option("--features", default="", metavar="NAMES",
              help="Comma-separated submodule names whose outputs are matched to the teacher's (MSE, "
                   "through a learned 1x1 projection when the student's layer is narrower).")
@click.option("--feature-weight", type=float, default=1.0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of --data held back for early stopping.")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
              help="Stop after this many epochs without a better held-back loss.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--then", "then", metavar="PIPELINE",
              help="Passes to run on the distilled model, e.g. \"O1,quantize-int8\" (--data calibrates).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def distill(student, teacher, state_dict, data, labels_key, epochs, batch_size, lr, temperature, alpha, features,
            feature_weight, val_fraction, patience, seed, then, output, quiet):
    """Fine-tune the pruned STUDENT (ONNX) against its TEACHER (torch) with a distillation loss.

    The teacher module is copied, resized to the student's widths and loaded with the student's
    weights (checked against onnxruntime), trained, exported, then optionally run through --then.
    Distill a student pruned without O1 (its BatchNorms kept), then fold with --then "O1,...".
    """
    from onnxforge.cli._console import console as make_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxforge.distill import KDConfig, distill as run_distill, load_factory
    from onnxforge.errors import OnnxforgeError

    if output.resolve() == student.resolve():
        raise OnnxforgeError("-o is the student file; onnxforge never overwrites its input")
    try:
        config = KDConfig(epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, alpha=alpha,
                          features=tuple(f.strip() for f in features.split(",") if f.strip()),
                          feature_weight=feature_weight, val_fraction=val_fraction, patience=patience, seed=seed)
    except ValueError as exc:
        raise OnnxforgeError(f"distill: {exc}") from None
    module = load_factory(teacher, state_dict)
    console = make_console()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=make_console(stderr=True), transient=True, disable=quiet) as bar:
        task = bar.add_task("distilling", total=None)
        result = run_distill(module, str(student), str(data), labels=labels_key, config=config, then=then,
                             output=output,
                             progress=lambda done, total, text: bar.update(task, completed=done, total=total,
                                                                           description=text))
    r, t = result.rebuild, result.train
    console.print(f"rebuilt {len(r.assigned)} tensors from {student.name} ({len(r.resized)} layers resized"
                  + (f", {len(r.fused_bn)} BatchNorms fused" if r.fused_bn else "")
                  + f"; torch vs onnxruntime max abs {r.max_abs_diff:.2g})")
    for h in t.history:
        acc = "" if h.val_accuracy is None else f", held-back accuracy {100 * h.val_accuracy:.2f}%"
        console.print(f"epoch {h.epoch:3d}: train {h.train_loss:.4f}, held-back {h.val_loss:.4f}, "
                      f"agreement {100 * h.val_agreement:.2f}%{acc}")
    stop = "stopped early" if t.stopped_early else "all epochs"
    console.print(f"best epoch {t.best_epoch} ({stop}; {t.n_train} train / {t.n_val} held-back samples)")
    if then:
        console.print(f"then: {then}")
    console.print(f"wrote {output}")
