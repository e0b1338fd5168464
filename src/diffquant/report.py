"""`diffquant report`: one self-contained HTML page (images embedded) from benchmark JSON files:
a table per model, the sample grids of every method from the same noise, and effective bits
against FID-to-FP."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from diffquant.io_utils import atomic_path

COLUMNS = [
    ("method", "method", "{}"), ("effective_bits", "eff. bits", "{:.3f}"), ("checkpoint_bytes", "ckpt bytes", "{:,}"),
    ("fid", "FID", "{:.2f}"), ("sfid", "sFID", "{:.2f}"), ("is", "IS", "{:.2f}"),
    ("precision", "prec.", "{:.3f}"), ("recall", "recall", "{:.3f}"), ("fid_to_fp", "FID-to-FP", "{:.3f}"),
    ("class_accuracy", "class acc.", "{:.3f}"), ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
]


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _bits_plot(rows: list[dict], model: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for r in rows:
        if r["method"] == "fp":
            continue
        y = max(r.get("fid_to_fp", 0.0), 1e-3)
        marker = "s" if r["method"].startswith("peer:") else "o"
        ax.scatter(r["effective_bits"], y, marker=marker)
        ax.annotate(r["method"].replace("peer:", ""), (r["effective_bits"], y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("effective weight bits (codes + scales + zeros + centroids)")
    ax.set_ylabel("FID to FP samples (log)")
    ax.set_title(f"{model}: bits vs. distance from the FP model")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[dict]) -> str:
    head = "".join(f"<th>{h}</th>" for _, h, _ in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append(f"<td>{html.escape(fmt.format(v)) if v is not None else '-'}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kernel_plot(rows: list[dict]) -> bytes:
    """Speed-up over fp32 dense against tokens, one line per (layer, config), for our kernel."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, cfg in zip(axes, ("1x8", "2x8"), strict=True):
        lut = [r for r in rows if r["impl"] == "diffquant_lut" and r["config"] == cfg]
        for layer in dict.fromkeys(r["layer"] for r in lut):
            pts = sorted((r["tokens"], r["speedup_vs_fp32"]) for r in lut if r["layer"] == layer)
            ax.plot(*zip(*pts, strict=True), marker="o", label=layer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"diffquant_lut, {cfg} codebooks")
        ax.set_xlabel("tokens (batch x pixels for convolutions)")
    axes[0].set_ylabel("speed-up over torch fp32 dense")
    axes[1].legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _kernel_section(name: str, doc: dict) -> str:
    rows = doc["rows"]
    m = doc.get("provenance", {}).get("machine", {})
    cols = ["layer", "config", "tokens", "impl", "median_ms", "speedup_vs_fp32", "flop_bound", "weight_bytes",
            "max_rel_error"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '-')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return (f"<h2>{html.escape(name)}: AQ kernels</h2><p>commit {doc.get('provenance', {}).get('commit')} · "
            f"{html.escape(str(m.get('cpu')))} · {doc.get('threads')} threads · median of timed runs; "
            "flop_bound = dense multiply-adds / lookup operations</p>"
            + _img_tag(_kernel_plot(rows), "kernel speed-ups") + f"<table><tr>{head}</tr>{body}</table>")


def _rows_table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '-')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def _provenance_line(doc: dict) -> str:
    m = doc.get("machine", {})
    return (f"<p>commit {doc.get('commit')} · {html.escape(str(m.get('cpu')))} ({m.get('cores')} cores, "
            f"torch {m.get('torch')}) · wall {doc.get('wall_time_s')} s</p>")


def _memory_section(name: str, doc: dict) -> str:
    """benchmarks/accuquant_memory.py: calibration memory and time against M, gradient agreement."""
    cols = ["grad", "M", "unit", "batch", "s_per_iter", "graph_peak_mib", "peak_rss_mib"]
    agree = doc.get("gradient_agreement", [])
    acols = list(agree[0]) if agree else []
    return (f"<h2>{html.escape(name)}: AccuQuant calibration memory against M</h2>" + _provenance_line(doc)
            + "<p>graph_peak_mib: the autograd graph's peak (what grows with M for exact back-propagation); "
              "o1: one step's graph at a time.</p>" + _rows_table(doc["rows"], cols)
            + ("<h3>O(1) gradient against the exact one</h3>" + _rows_table(agree, acols) if agree else ""))


def _trajectory_section(res: Path, doc: dict) -> str:
    """benchmarks/trajectory.py: per-step and accumulated distance from the FP trajectory."""
    rows = [{"method": k, "per_step_rms_mean": sum(v["per_step_rms"]) / v["steps"],
             "accumulated_rms_end": v["accumulated_rms"][-1]} for k, v in doc["results"].items()]
    png = res.parent / doc.get("plot", "")
    img = _img_tag(png.read_bytes(), "trajectory error") if doc.get("plot") and png.exists() else ""
    return (f"<h2>{html.escape(res.name)}: error accumulation, {html.escape(doc['model'])} "
            f"{html.escape(doc.get('setting', ''))}</h2>" + _provenance_line(doc) + img
            + _rows_table(rows, ["method", "per_step_rms_mean", "accumulated_rms_end"]))


def _sensitivity_section(res: Path, doc: dict) -> str:
    """benchmarks/sensitivity.py: predictor quality, the label check, recipes and the plots."""
    preds = [{"predictor": k, **v["mean"]} for k, v in doc["predictors"].items()]
    recs = []
    for k, v in doc["recipes"].items():
        label = {f"label_{a}": b for a, b in v.get("label", {}).items() if a != "key"}
        recs.append({"recipe": k, "effective_bits": v["effective_bits"], "search": v.get("search", "-"), **label})
    cands = [{"recipe": k, "candidate": c, **{a: b for a, b in lab.items() if a != "key"}}
             for k, v in doc["recipes"].items() for c, lab in v.get("candidates", {}).items()]
    uni = [{"uniform": k, **{a: b for a, b in v.items() if a != "key"}} for k, v in doc.get("uniform", {}).items()]
    plots = res.parent / doc.get("plots_dir", "")
    imgs = "".join(_img_tag((plots / p).read_bytes(), p, 520) for p in
                   ["sensitivity-by-role.png", "sensitivity-by-block.png", "pareto.png",
                    *[f"recipe-{k}.png" for k in doc["recipes"]]] if doc.get("plots_dir") and (plots / p).exists())
    check = doc.get("label_check")
    return (f"<h2>{html.escape(res.name)}: Qua²SeDiMo on {html.escape(doc['model'])}</h2>" + _provenance_line(doc)
            + f"<p>{len(doc['labels'])} random configurations labelled with {doc['settings']['n']} images each; "
              f"{doc['settings']['folds']}-fold held-out ranking quality of the target "
              f"{html.escape(doc['settings']['target'])} (lower is better).</p>"
            + _rows_table(preds, ["predictor", "spearman", "ndcg10"])
            + (f"<p>label check: {html.escape(json.dumps(check))}</p>" if check else "")
            + "<h3>recipes</h3>" + _rows_table(recs, list(recs[0]) if recs else [])
            + ("<h3>candidates at each target (predicted by the GNN ensemble, '-' for candidates with AQ "
               "options, which it never saw; measured by the label; the lowest measured is the recipe)</h3>"
               + _rows_table(cands, list(cands[0])) if cands else "")
            + "<h3>uniform configurations</h3>" + _rows_table(uni, list(uni[0]) if uni else [])
            + f"<div class='grids'>{imgs}</div>")


def make_report(results: list[Path | str], out: Path | str) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>diffquant report</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right} th{background:#eee}"
             ".grids{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:12px}"
             "</style><h1>diffquant report</h1>"]
    for res in results:
        res = Path(res)
        doc = json.loads(res.read_text())
        kind = doc.get("benchmark")
        if kind == "trajectory":
            parts.append(_trajectory_section(res, doc))
            continue
        if kind == "sensitivity":
            parts.append(_sensitivity_section(res, doc))
            continue
        if kind == "accuquant_memory":
            parts.append(_memory_section(res.name, doc))
            continue
        rows = doc.get("rows", [])
        if not rows:
            raise ValueError(f"{res} holds no result rows; run a benchmark first")
        if "impl" in rows[0]:  # benchmarks/kernels.py
            parts.append(_kernel_section(res.name, doc))
            continue
        m = doc.get("machine", {})
        parts.append(f"<h2>{html.escape(res.name)}</h2><p>benchmark {doc.get('benchmark')} · n={doc.get('n')} · "
                     f"DDIM {doc.get('steps')} steps · seed {doc.get('seed')} · commit {doc.get('commit')} · "
                     f"{html.escape(str(m.get('cpu')))} ({m.get('cores')} cores, torch {m.get('torch')}) · "
                     f"wall {doc.get('wall_time_s')} s</p>")
        grids_dir = res.parent / doc.get("grids_dir", "")
        for model in dict.fromkeys(r["model"] for r in rows):
            mrows = [r for r in rows if r["model"] == model]
            parts.append(f"<h3>{html.escape(model)}</h3>")
            parts.append(_table(mrows))
            parts.append("<p>FID, sFID, IS, precision, recall: against the 5,000 real images; FID-to-FP, PSNR, "
                         "SSIM: against the FP model's samples from the same noise. All with the shipped "
                         "MNIST feature network.</p>")
            parts.append(_img_tag(_bits_plot(mrows, model), f"{model} bits plot"))
            figs = []
            for r in mrows:
                g = grids_dir / r.get("grid", "")
                if r.get("grid") and g.exists():
                    figs.append(f"<figure>{_img_tag(g.read_bytes(), r['method'], 360)}"
                                f"<figcaption>{html.escape(r['method'])} (samples 0-39, same noise)"
                                "</figcaption></figure>")
            if figs:
                parts.append(f"<div class='grids'>{''.join(figs)}</div>")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
    return out
