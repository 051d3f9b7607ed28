"""One self-contained HTML page for ``optimize``, ``tune`` and ``sensitivity`` (``--report report.html``).

Self-contained means it opens from a CI artifact or an e-mail with no network: the CSS is inline,
plots are PNG images embedded as ``data:`` URIs (rendered with matplotlib's Agg backend), and the page
references no URL. Every value that comes from a model (node names, reasons) is HTML-escaped.

A page is a :class:`Page` of sections; each section has an ``id`` (``summary``, ``passes``,
``plots``, ``quant-error``, ``float-ops``, ``pareto``, ``sensitivity``, ``notes``) that tests and
readers can find. The builders :func:`optimize_page`, :func:`tune_page` and :func:`sensitivity_page`
fill it from the manager's :class:`~onnxforge.passes.manager.Report`, the tune outcome and the
sensitivity result.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from onnxforge.passes.manager import Report, _delta
from onnxforge.runtime.sqnr import LayerSQNR

# Below this an int8 layer loses more than ~2.5 bits of its 8: worth a look (or `exclude`).
LOW_SQNR_DB = 20.0

_CSS = """
:root { --fg:#1d232a; --muted:#5b6770; --line:#dde3e8; --accent:#1f6feb; --bad:#c62828; --ok:#2e7d32;
        --bg:#ffffff; --card:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 24px 32px 48px; max-width: 1180px; }
header h1 { font-size: 22px; margin: 0 0 4px; }
header .sub { color: var(--muted); font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
              word-break: break-all; }
h2 { font-size: 16px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 9px 14px; min-width: 150px; }
.card .k { color: var(--muted); font-size: 11.5px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 17px; font-weight: 600; margin-top: 2px; white-space: nowrap; }
.card .v small { font-size: 12px; font-weight: 400; color: var(--muted); }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--card); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
tr.bad td { color: var(--bad); }
table.passes td:first-child { white-space: nowrap; }
tr.chosen td { background: #eef6ee; font-weight: 600; }
.yes { color: var(--ok); font-weight: 600; }
.fail { color: var(--bad); font-weight: 700; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; flex: 1 1 480px; max-width: 720px; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.note { color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.failure { background: #fdecea; border: 1px solid #f5c2c0; border-radius: 6px; padding: 8px 12px; color: var(--bad); }
footer { margin-top: 36px; color: var(--muted); font-size: 11.5px; }
"""


# --------------------------------------------------------------------------- page model


@dataclasses.dataclass
class Section:
    id: str
    title: str
    body: str  # already-escaped HTML


@dataclasses.dataclass
class Page:
    title: str
    subtitle: str = ""
    cards: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # label, value, detail
    sections: list[Section] = dataclasses.field(default_factory=list)

    def add(self, id: str, title: str, body: str) -> None:
        self.sections.append(Section(id, title, body))

    def to_html(self) -> str:
        from onnxforge import __version__

        e = html.escape
        cards = "".join(
            f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}'
            + (f" <small>{e(d)}</small>" if d else "") + "</div></div>"
            for k, v, d in self.cards
        )
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f'<header><h1>{e(self.title)}</h1><div class="sub">{e(self.subtitle)}</div></header>',
            f'<section id="summary"><div class="cards">{cards}</div></section>' if cards else "",
        ]
        for s in self.sections:
            parts.append(f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>{s.body}</section>')
        parts.append(f"<footer>onnxforge {e(__version__)} · self-contained report (no network)</footer>")
        parts.append("</body></html>\n")
        return "\n".join(p for p in parts if p)

    def write(self, path: str | pathlib.Path) -> pathlib.Path:
        from onnxforge.atomic import atomic_write_bytes

        path = pathlib.Path(path)
        atomic_write_bytes(path, self.to_html().encode("utf-8"))
        return path


# --------------------------------------------------------------------------- building blocks


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (),
          mono: Sequence[int] = (), row_classes: Sequence[str] | None = None, raw: Sequence[int] = (),
          cls: str = "") -> str:
    """An HTML table; cells are escaped except the columns in ``raw`` (trusted markup built here)."""
    e = html.escape
    num, mon, raws = set(numeric), set(mono), set(raw)
    head = "".join(f'<th class="num">{e(h)}</th>' if i in num else f"<th>{e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        row_cls = row_classes[r] if row_classes else ""
        cells = []
        for i, cell in enumerate(row):
            text = str(cell) if i in raws else e(str(cell))
            klass = "num" if i in num else ("mono" if i in mon else "")
            cells.append(f'<td class="{klass}">{text}</td>' if klass else f"<td>{text}</td>")
        body.append((f'<tr class="{row_cls}">' if row_cls else "<tr>") + "".join(cells) + "</tr>")
    table_cls = f' class="{cls}"' if cls else ""
    return f"<table{table_cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "∞ (identical)" if v > 0 else "-∞"
    return f"{v:.1f}"


# --------------------------------------------------------------------------- sections


def passes_table(report: Report) -> str:
    rows, classes = [], []
    for r in report.records:
        label = r.name if r.iteration == 0 else f"{r.name} (round {r.iteration + 1})"
        diff = "-"
        if r.vs_original is not None:
            diff = f"{r.vs_original.max_abs:.2e}"
            if r.verified is False:
                diff += ' <span class="fail">FAIL</span>'
        counts = (r.stats.get("counts") or {})
        what = ", ".join(f"{k} ×{v}" for k, v in counts.items() if v)
        skipped = r.stats.get("skipped") or []
        if skipped:
            what += (", " if what else "") + f"left {len(skipped)} alone"
        rows.append([
            html.escape(label), '<span class="yes">yes</span>' if r.modified else "",
            html.escape("lossless" if r.lossless else "lossy"),
            html.escape(_delta(r.before.get("nodes"), r.after.get("nodes"))),
            html.escape(_delta(r.before.get("params"), r.after.get("params"))),
            html.escape(_delta(r.before.get("param_bytes"), r.after.get("param_bytes"), human=True)),
            f"{r.seconds * 1000:.0f} ms", diff, html.escape(what),
        ])
        classes.append("bad" if r.verified is False else "")
    headers = ["pass", "changed", "kind", "nodes", "params", "bytes", "time", "max abs diff vs original",
               "what it did"]
    out = table(headers, rows, numeric=(3, 4, 5, 6, 7), row_classes=classes, raw=range(len(headers)),
                cls="passes")
    if report.failed_pass:
        out += f'<p class="failure">first failing pass: {html.escape(report.failed_pass)}: ' \
               f"{html.escape(report.failure or '')}</p>"
    return out


def sqnr_table(rows: Sequence[LayerSQNR]) -> str:
    body = [[r.node, r.op_type, r.value, _fmt_db(r.sqnr_db), r.samples or "-", r.note] for r in rows]
    classes = ["bad" if r.sqnr_db is not None and r.sqnr_db < LOW_SQNR_DB else "" for r in rows]
    return table(["layer", "op", "output", "SQNR (dB)", "samples", "note"], body, numeric=(3, 4), mono=(0, 2),
                 row_classes=classes)


def sqnr_plot(rows: Sequence[LayerSQNR]) -> bytes | None:
    finite = [r for r in rows if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    if not finite:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    colors = ["#c62828" if r.sqnr_db < LOW_SQNR_DB else "#1f77b4" for r in finite]
    ax.bar(range(len(finite)), [r.sqnr_db for r in finite], color=colors)
    ax.axhline(LOW_SQNR_DB, color="#c62828", lw=0.8, ls=":", label=f"{LOW_SQNR_DB:.0f} dB")
    ax.set_xticks(range(len(finite)))
    ax.set_xticklabels([r.node for r in finite], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("per-layer quantization error (float vs int8 activations)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def size_plot(report: Report) -> bytes | None:
    if not report.records:
        return None
    plt = _pyplot()
    labels = ["input"] + [r.name for r in report.records]
    sizes = [report.before.get("param_bytes", 0)] + [r.after.get("param_bytes", 0) for r in report.records]
    nodes = [report.before.get("nodes", 0)] + [r.after.get("nodes", 0) for r in report.records]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.step(range(len(labels)), [s / 1024 for s in sizes], where="mid", color="#1f77b4", label="parameter KiB")
    ax.set_ylabel("parameter KiB", color="#1f77b4")
    ax2 = ax.twinx()
    ax2.step(range(len(labels)), nodes, where="mid", color="#ff7f0e", label="nodes")
    ax2.set_ylabel("nodes", color="#ff7f0e")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_title("size after each pass", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def float_ops_table(rows: Sequence[dict[str, str]]) -> str:
    return table(["node", "op", "reason it stayed float", "pass"],
                 [[r["node"], r["op_type"], r["reason"], r["pass"]] for r in rows], mono=(0,))


def _quant_sections(page: Page, sqnr: Sequence[LayerSQNR] | None, sqnr_note: str,
                    floats: Sequence[dict[str, str]] | None) -> list[bytes]:
    plots = []
    if sqnr is not None:
        body = sqnr_table(sqnr) if sqnr else note("no layer was quantized")
        page.add("quant-error", "Per-layer quantization error (SQNR)",
                 note("SQNR = 10·log10(Σx² / Σ(x−y)²) of each quantized layer's output, float model x vs "
                      f"quantized model y on the same inputs; red rows are under {LOW_SQNR_DB:.0f} dB. "
                      + sqnr_note) + body)
        png = sqnr_plot(sqnr)
        if png:
            plots.append(png)
    if floats is not None:
        page.add("float-ops", "Ops that stayed float, and why",
                 float_ops_table(floats) if floats else note("every candidate op was quantized"))
    return plots


def _fidelity_card(report: Report) -> tuple[str, str, str] | None:
    last = next((r for r in reversed(report.records) if r.vs_original is not None), None)
    if last is None:
        return None
    return ("max abs diff vs input", f"{last.vs_original.max_abs:.2e}", f"cosine {last.vs_original.cosine:.6f}")


# --------------------------------------------------------------------------- pages


def optimize_page(report: Report, *, model: str, sqnr: Sequence[LayerSQNR] | None = None, sqnr_note: str = "",
                  floats: Sequence[dict[str, str]] | None = None, notes: Sequence[str] = ()) -> Page:
    """The page for ``onnxforge optimize``: summary, per-pass table, plots, SQNR, float ops."""
    page = Page(title=f"onnxforge optimize · {pathlib.Path(model).name}",
                subtitle=f"pipeline: {report.pipeline} · target: {report.target}")
    b, a = report.before, report.after
    page.cards += [
        ("nodes", _delta(b.get("nodes"), a.get("nodes")), ""),
        ("parameters", _delta(b.get("params"), a.get("params")), ""),
        ("parameter bytes", _delta(b.get("param_bytes"), a.get("param_bytes"), human=True), ""),
    ]
    if b.get("param_bytes") and a.get("param_bytes") is not None:
        page.cards[-1] = (page.cards[-1][0], page.cards[-1][1], f"×{a['param_bytes'] / b['param_bytes']:.3f}")
    lat = report.extra.get("latency")
    if lat:
        page.cards.append(("latency p50", f"{lat['before_ms']:.3f} → {lat['after_ms']:.3f} ms",
                           f"×{lat['ratio']:.3f}, interleaved"))
    card = _fidelity_card(report)
    if card:
        page.cards.append(card)
    page.cards.append(("pipeline time", f"{report.seconds:.2f} s", f"{len(report.records)} pass runs"))
    page.add("passes", "Per-pass report", passes_table(report))
    plots = [p for p in [size_plot(report)] if p]
    plots += _quant_sections(page, sqnr, sqnr_note, floats)
    if plots:
        captions = ["parameter bytes and nodes after each pass", "SQNR per quantized layer"]
        body = "".join(image(p, c, c) for p, c in zip(plots, captions))
        page.sections.insert(1, Section("plots", "Plots", f'<div class="plots">{body}</div>'))
    _notes(page, list(notes) + report.lossy_notes())
    return page


def tune_page(result: Any, *, model: str, metric: str, base: str, plot_png: bytes | None,
              chosen_report: Report | None = None, sqnr: Sequence[LayerSQNR] | None = None, sqnr_note: str = "",
              floats: Sequence[dict[str, str]] | None = None, notes: Sequence[str] = ()) -> Page:
    """The page for ``onnxforge tune``: the chosen candidate, the Pareto plot and front, its passes."""
    from onnxforge.tune.report import short_pipeline

    page = Page(title=f"onnxforge tune · {pathlib.Path(model).name}",
                subtitle=f"base pipeline: {base or '(none)'} · metric: {metric}")
    c = result.chosen
    if c is not None:
        page.cards += [
            ("latency ratio", f"×{c.latency_ratio:.3f}" if c.latency_ratio is not None else "-", "chosen / original"),
            (metric, f"{c.metric:.4g}" if c.metric is not None else "-", f"drop {c.drop:.3g}" if c.drop is not None else ""),
            ("size ratio", f"×{c.size_ratio:.3f}" if c.size_ratio is not None else "-", ""),
        ]
    page.cards.append(("candidates", f"{len(result.candidates)}", f"{len(result.front)} on the front"))
    if plot_png:
        page.add("pareto", "Pareto front", f'<div class="plots">{image(plot_png, "Pareto front", "latency vs " + metric)}</div>')
    rows, classes = [], []
    for cand in result.front:
        chosen = c is not None and cand.pipeline == c.pipeline
        rows.append(["★" if chosen else "", _f(cand.latency_ratio, ".3f"), _f(cand.latency_ms, ".4f"),
                     _f(cand.size_ratio, ".3f"), _f(cand.metric, ".4g"), _f(cand.drop, ".4g"),
                     short_pipeline(cand.pipeline, base)])
        classes.append("chosen" if chosen else "")
    page.add("front", "Candidates on the front",
             table(["chosen", "latency ratio", "latency ms", "size ratio", metric, "drop", "settings after the base"],
                   rows, numeric=(1, 2, 3, 4, 5), mono=(6,), row_classes=classes))
    if chosen_report is not None:
        page.add("passes", "Per-pass report of the chosen pipeline", passes_table(chosen_report))
    _sqnr_figure_inside(page, _quant_sections(page, sqnr, sqnr_note, floats), "SQNR per quantized layer")
    extra = [] if c is not None else ["No candidate met the constraints (--max-drop, --max-latency-ms): "
                                      "nothing was chosen."]
    if getattr(result, "interrupted", False):
        extra.append("The run was interrupted: these are the candidates that finished.")
    _notes(page, extra + list(getattr(result, "notes", [])) + list(notes))
    return page


def sensitivity_page(result: dict[str, Any], *, plot_png: bytes | None, sqnr: Sequence[LayerSQNR] | None = None,
                     sqnr_note: str = "", floats: Sequence[dict[str, str]] | None = None,
                     notes: Sequence[str] = ()) -> Page:
    """The page for ``onnxforge sensitivity``: the per-layer drop plot and table, SQNR of int8 everywhere."""
    metric = result["metric"]
    page = Page(title=f"onnxforge sensitivity · {pathlib.Path(result['model']).name}",
                subtitle=f"base pipeline: {result.get('base') or '(none)'} · metric: {metric}"
                         + (f" · pruning ratio {result['ratio']} ({result['criterion']})"
                            if any(r["kind"] == "prune" for r in result["rows"]) else ""))
    page.cards.append((f"baseline {metric}", f"{result['baseline']:.4g}", ""))
    rows = result["rows"]
    page.cards.append(("layers tried", str(len(rows)), ""))
    if plot_png:
        page.add("sensitivity-plot", "Sensitivity", f'<div class="plots">{image(plot_png, "sensitivity", metric + " drop per layer")}</div>')
    body = []
    for r in sorted(rows, key=lambda r: (r["kind"], -(r["drop"] or 0))):
        label = r["layer"] + (f" (+{len(r['group']) - 1})" if len(r["group"]) > 1 else "")
        body.append([r["kind"], label, "failed" if r["drop"] is None else f"{r['drop']:.4g}",
                     _f(r["metric"], ".4g"), _f(r["size_ratio"], ".3f")])
    page.add("sensitivity", "Drop when one layer alone is changed",
             table(["what", "layer", "drop", metric, "size ratio"], body, numeric=(2, 3, 4), mono=(1,)))
    _sqnr_figure_inside(page, _quant_sections(page, sqnr, sqnr_note, floats), "SQNR per layer, every layer int8")
    _notes(page, list(result.get("notes") or []) + list(notes))
    return page


def _sqnr_figure_inside(page: Page, plots: list[bytes], caption: str) -> None:
    """Put the SQNR plot in the SQNR section, after its table."""
    section = next((s for s in page.sections if s.id == "quant-error"), None)
    if plots and section is not None:
        section.body += f'<div class="plots">{image(plots[0], "SQNR", caption)}</div>'


def _notes(page: Page, notes: Sequence[str]) -> None:
    if notes:
        page.add("notes", "Notes", "".join(note(n) for n in notes))


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


__all__ = ["LOW_SQNR_DB", "Page", "Section", "optimize_page", "sensitivity_page", "tune_page"]
