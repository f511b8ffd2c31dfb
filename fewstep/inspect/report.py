"""Renderers for `fewstep inspect`: an aligned text table, Markdown, JSON and CSV of a `ModelReport`.

`rows(component, depth)` is the one view every format shares: each module name in execution order,
cut at `depth` levels of the name hierarchy (`down_blocks.0.resnets.0` is depth 4), each row carrying
the totals of everything below it (`own_params` / `own_flops` are the module's alone, so summing the
own columns, or the block rows, gives the component's totals). Without a depth, every module is a row
except ModuleLists, which never run and own nothing.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass

from .records import Component, Layer, ModelReport


@dataclass
class Row:
    name: str
    depth: int
    type: str
    params: int  # this module and everything below it
    flops: int
    own_params: int
    own_flops: int
    input_shape: tuple | None
    output_shape: tuple | None
    activation_bytes: int
    layer: Layer | None  # None for a pure container (a ModuleList, the VAE's decoder ...)


def _depth(name: str) -> int:
    return name.count(".") + 1


def rows(c: Component, depth: int | None = None) -> list[Row]:
    layers = c.layers
    by_name = {layer.name: layer for layer in layers}
    names: list[str] = []
    sums: dict[str, list[int]] = {}
    for layer in layers:
        parts = layer.name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix not in sums:
                sums[prefix] = [0, 0]
                if (k <= depth) if depth is not None else (prefix in by_name and by_name[prefix].type != "ModuleList"):
                    names.append(prefix)
            sums[prefix][0] += layer.params
            sums[prefix][1] += layer.flops
    out = []
    for name in names:
        layer = by_name.get(name)
        if layer is None:  # a container: first and last of its top-most measured descendants
            below = [m for m in layers if m.name.startswith(name + ".")]
            top = min(_depth(m.name) for m in below)
            below = [m for m in below if _depth(m.name) == top and m.output_shape is not None]
            first, last = (below[0], below[-1]) if below else (None, None)
            out.append(Row(name, _depth(name), c.types.get(name, ""), *sums[name], 0, 0,
                           first and first.input_shape, last and last.output_shape,
                           last.activation_bytes if last else 0, None))
        else:
            out.append(Row(name, _depth(name), layer.type, *sums[name], layer.params, layer.flops,
                           layer.input_shape, layer.output_shape, layer.activation_bytes, layer))
    return out


# ---- number formatting ------------------------------------------------------------------------------


def si(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {prefix}{unit}"
    return f"{n:.4g} {unit}".rstrip() if n else "0"


def nbytes(n: int) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}"
    return f"{n} B"


def shape(s) -> str:
    return "x".join(map(str, s)) if s else ""


def _pair(t) -> str:
    if t is None:
        return ""
    return t if isinstance(t, str) else ("x".join(map(str, t)) if len(set(t)) > 1 else str(t[0]))


def attention_text(a) -> str:
    return f"{a.kind} {a.heads}x{a.head_dim} q{a.q_len} kv{a.kv_len}" if a else ""


def _layer_cells(r: Row) -> list[str]:
    m = r.layer
    if m is None:
        return ["", "", "", "", "", ""]
    io_ = f"{m.in_features}->{m.out_features}" if m.in_features is not None else ""
    kernel = "x".join(map(str, m.kernel)) if m.kernel else ""
    return [kernel, _pair(m.stride), _pair(m.padding), str(m.groups or ""), io_, attention_text(m.attention) or m.note]


# ---- text tables --------------------------------------------------------------------------------------


def table(headers: list[str], body: list[list], md: bool = False) -> str:
    cells = [[str(x) for x in row] for row in body]
    if md:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [i for i, h in enumerate(headers) if h in NUMERIC]
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(row) for row in cells])


NUMERIC = {"params", "FLOPs", "activation", "fp32", "fp16", "bf16", "peak activation", "skip ch", "x ch",
           "in ch", "heads", "head dim", "query len", "kv len", "count", "saved", "of A", "FLOPs saved"}
LAYER_HEADERS = ["name", "type", "kernel", "stride", "padding", "groups", "in->out", "attention / note",
                 "input", "output", "params", "FLOPs", "activation"]


def _sections(report: ModelReport, depth: int | None) -> list[tuple[str, list[str], list[list]]]:
    """(title, headers, rows) of every table of the report, shared by the text and Markdown renderers."""
    t = report.totals
    out = [("Components", ["component", "type", "folder", "runs", "params", "fp32", "fp16", "bf16", "FLOPs",
                           "peak activation"],
            [[c.name, c.type, c.folder, c.runs, f"{c.params:,}", *map(nbytes, c.param_bytes.values()),
              si(c.flops), nbytes(c.peak_activation_bytes)] for c in report.components]
            + [["total", "", "", "", f"{t.params:,}", *(nbytes(t.params * k) for k in (4, 2, 2)), "", ""]])]
    cfg_note = "with classifier-free guidance (UNet and text encoders on batch x2)"
    out.append((f"Per image: text-to-image in {t.steps} step{'s' * (t.steps > 1)}", ["", "FLOPs", cfg_note], [
        ["UNet, per denoising step", si(t.unet_step_flops // report.batch), si(t.unet_step_flops_cfg // report.batch)],
        ["text encoders, once", si(t.text_flops), si(2 * t.text_flops)],
        ["decoder, once", si(t.decoder_flops), si(t.decoder_flops)],
        ["text-to-image", si(t.image_flops), si(t.image_flops_cfg)]]))
    if report.unet is not None:
        u = report.unet
        out.append(("UNet resamplers", ["name", "method", "kernel", "stride", "padding", "input", "output"],
                    [[r.name, r.method, "x".join(map(str, r.kernel)), _pair(r.stride), _pair(r.padding),
                      shape(r.input_shape), shape(r.output_shape)] for r in u.resamplers]))
        out.append(("UNet skip connections (concatenated on channels: x + skip -> resnet input)",
                    ["source", "target", "skip shape", "x ch", "skip ch", "in ch"],
                    [[s.source, s.target, shape(s.shape), s.x_channels, s.skip_channels, s.total_channels]
                     for s in u.skips]))
        out.append(("UNet attention (keys/values of cross-attention: the text tokens)",
                    ["block", "kind", "heads", "head dim", "query len", "kv len", "count"],
                    [[a.block, a.kind, a.heads, a.head_dim, a.q_len, a.kv_len, a.count] for a in u.attention]))
    for c in report.components:
        out.append((f"{c.name}: blocks", ["name", "type", "input", "output", "params", "FLOPs", "activation"],
                    [[b.name, b.type, shape(b.input_shape), shape(b.output_shape), f"{b.params:,}", si(b.flops),
                      nbytes(b.activation_bytes)] for b in c.blocks]))
        title = f"{c.name}: layers" + (f" (depth {depth})" if depth else "")
        out.append((title, LAYER_HEADERS,
                    [[r.name, r.type, *_layer_cells(r), shape(r.input_shape), shape(r.output_shape),
                      f"{r.params:,}", si(r.flops), nbytes(r.activation_bytes) if r.output_shape else ""]
                     for r in rows(c, depth)]))
    return out


def heading(title: str, md: bool) -> str:
    return f"## {title}" if md else f"{title}\n{'=' * len(title)}"


def _header(report: ModelReport) -> list[str]:
    h, w = report.latent
    return [f"{report.model}: {report.description}".rstrip(": "),
            f"{report.resolution}x{report.resolution} image, {h}x{w} latent, batch {report.batch}, {report.dtype}; "
            "FLOPs count a multiply-add as 2"]


def render_text(report: ModelReport, depth: int | None = None, md: bool = False) -> str:
    head = _header(report)
    parts = [f"# {head[0]}\n\n{head[1]}" if md else "\n".join(head)]
    for title, headers, body in _sections(report, depth):
        parts.append(heading(title, md) + "\n\n" + table(headers, body, md))
    return "\n\n".join(parts) + "\n"


# ---- JSON and CSV ---------------------------------------------------------------------------------------


def _row_dict(r: Row) -> dict:
    d = {k: v for k, v in asdict(r).items() if k != "layer"}
    if r.layer is not None:
        m = asdict(r.layer)
        for k in ("kernel", "stride", "padding", "groups", "in_features", "out_features", "attention", "note"):
            d[k] = m[k]
    return d


def to_dict(report: ModelReport, depth: int | None = None) -> dict:
    comps = []
    for c in report.components:
        comps.append(dict(name=c.name, role=c.role, type=c.type, folder=c.folder, runs=c.runs, inputs=c.inputs,
                          params=c.params, param_bytes=c.param_bytes, flops=c.flops,
                          peak_activation_bytes=c.peak_activation_bytes,
                          blocks=[{k: v for k, v in asdict(b).items() if k != "layers"} for b in c.blocks],
                          layers=[_row_dict(r) for r in rows(c, depth)]))
    return dict(model=report.model, description=report.description, resolution=report.resolution,
                latent=report.latent, batch=report.batch, dtype=report.dtype, components=comps,
                totals=asdict(report.totals), unet=asdict(report.unet) if report.unet is not None else None)


CSV_COLUMNS = ["component", "name", "depth", "type", "kernel", "stride", "padding", "groups", "in_features",
               "out_features", "attention", "heads", "head_dim", "q_len", "kv_len", "note", "input_shape",
               "output_shape", "params", "flops", "own_params", "own_flops", "activation_bytes"]


def render_csv(report: ModelReport, depth: int | None = None) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in report.components:
        for r in rows(c, depth):
            d = _row_dict(r)
            a = d.pop("attention", None) or {}
            d.update(component=c.name, attention=a.get("kind", ""), heads=a.get("heads", ""),
                     head_dim=a.get("head_dim", ""), q_len=a.get("q_len", ""), kv_len=a.get("kv_len", ""))
            for k in ("kernel", "stride", "padding", "input_shape", "output_shape"):
                d[k] = _pair(d.get(k)) if k in ("kernel", "stride", "padding") else shape(d.get(k))
            w.writerow({k: ("" if d.get(k) is None else d.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def render(report: ModelReport, fmt: str = "table", depth: int | None = None) -> str:
    if fmt == "json":
        return json.dumps(to_dict(report, depth), indent=1) + "\n"
    if fmt == "csv":
        return render_csv(report, depth)
    return render_text(report, depth, md=fmt == "md")
