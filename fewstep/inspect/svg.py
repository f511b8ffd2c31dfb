"""`fewstep inspect --diagram`: a hand-written SVG picture of an inspected UNet (no plotting library).

The classic U-Net drawing (Ronneberger et al. 2015, Fig. 1): down blocks in the left column, one row
per resolution level, the mid block at the bottom, up blocks in the right column on the same rows.
Skip connections run left to right into the up block that concatenates them: the outputs of a down
block's resnets on the row itself, and the tensor entering the level (conv_in's output, or the level
above's downsampler output) from just above the row. Attention is marked per block, self in blue,
cross in orange.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from ..errors import FewstepError
from .records import ModelReport
from .report import si

BOX_W, BOX_H, ROW_H, GAP_X, MARGIN, TOP = 330, 100, 170, 400, 30, 150
LEFT, RIGHT = MARGIN, MARGIN + BOX_W + GAP_X
COLOURS = {"self": "#3b6fd4", "cross": "#e07b16", "down": "#eef3fb", "up": "#fbf1e8", "mid": "#eef7ee",
           "edge": "#555", "skip": "#8a8a8a"}


def _text(x, y, s, size=12, weight="normal", anchor="start", fill="#222") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
            f'fill="{fill}">{escape(str(s))}</text>')


def _arrow(d: str, colour: str, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.6"{dash} marker-end="url(#arrow)"/>'


def _box(x, y, b, fill) -> list[str]:
    """One block: name, resolution and channels, contents, attention badges."""
    res = f"{b.resolution[0]}x{b.resolution[1]}" if b.resolution else ""
    out = [f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" stroke="{COLOURS["edge"]}"/>',
           _text(x + 10, y + 20, b.name, 14, "bold"),
           _text(x + 10, y + 40, f"{res}  ·  {b.in_channels} → {b.out_channels} ch  ·  {si(b.params)} params"),
           _text(x + 10, y + 58, f"{b.resnets} resnet{'s' * (b.resnets != 1)}"
                 + (f" + {b.transformers} transformer{'s' * (b.transformers != 1)}" if b.transformers else "")
                 + (f" ({b.transformer_depth} deep)" if b.transformer_depth > 1 else "")
                 + f"  ·  {si(b.flops)}FLOPs")]
    for i, kind in enumerate(b.attention):
        bx = x + 10 + i * 112
        out += [f'<rect x="{bx}" y="{y + 68}" width="104" height="22" rx="11" fill="{COLOURS[kind]}"/>',
                _text(bx + 52, y + 83, f"{kind}-attention", 11, "bold", "middle", "#fff")]
    return out


def _small(x, y, w, title, sub) -> list[str]:
    return [f'<rect x="{x}" y="{y}" width="{w}" height="44" rx="6" fill="#f4f4f4" stroke="{COLOURS["edge"]}"/>',
            _text(x + w / 2, y + 18, title, 12, "bold", "middle"), _text(x + w / 2, y + 35, sub, 11, anchor="middle")]


def _row_y(level: int) -> int:
    return TOP + level * ROW_H


def unet_svg(report: ModelReport) -> str:
    """The UNet of `report` (which must have one) as a standalone SVG document."""
    u = report.unet
    blocks = {b.name: b for b in u.blocks}
    down = [b for b in u.blocks if b.stage == "down"]
    up = [b for b in u.blocks if b.stage == "up"]
    n = len(down)
    width, height = RIGHT + BOX_W + MARGIN, _row_y(n) + (BOX_H if "mid_block" in blocks else 0) + 60
    el = [_text(MARGIN, 30, f"{report.model} UNet at {report.resolution}x{report.resolution} "
                f"({report.latent[0]}x{report.latent[1]} latent), batch {report.batch}", 18, "bold"),
          _text(MARGIN, 52, f"{si(report.component('unet').params)} parameters, "
                f"{si(report.component('unet').flops)}FLOPs per step; dashed: skip connections (concatenated "
                "on channels)", 12)]
    time_names = [b.name for b in u.blocks if b.stage == "time"]
    el += _small(width / 2 - 195, 66, 390, " + ".join(time_names),
                 "timestep (+ SDXL size, pooled text) embedding → every resnet")
    conv_in, conv_out = blocks["conv_in"], blocks["conv_out"]
    el += _small(LEFT, TOP - 70, BOX_W, "conv_in", f"{conv_in.in_channels} → {conv_in.out_channels} ch, 3x3")
    tail = " → ".join(b.name for b in u.blocks if b.stage == "out")
    el += _small(RIGHT, TOP - 70, BOX_W, tail, f"{conv_out.in_channels} → {conv_out.out_channels} ch")
    el.append(_arrow(f"M{LEFT + BOX_W / 2} {TOP - 26} V{TOP - 2}", COLOURS["edge"]))
    el.append(_arrow(f"M{RIGHT + BOX_W / 2} {TOP} V{TOP - 24}", COLOURS["edge"]))
    el += _columns(u, down, up)
    el += _bottom(blocks, down, up, n)
    el += _skips(report, n)
    el += _legend(height - 30)
    defs = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0 0 L10 5 L0 10 z" fill="#555"/></marker></defs>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">\n{defs}\n'
            f'<rect width="100%" height="100%" fill="#fff"/>\n' + "\n".join(el) + "\n</svg>\n")


def _columns(u, down, up) -> list[str]:
    """Down blocks on the left with their downsamplers between rows, up blocks on the right."""
    el, n = [], len(down)
    for level, b in enumerate(down):
        el += _box(LEFT, _row_y(level), b, COLOURS["down"])
        if b.resampler:
            y0 = _row_y(level) + BOX_H
            r = next(r for r in u.resamplers if r.name.startswith(b.name + "."))
            el += [_arrow(f"M{LEFT + BOX_W / 2} {y0} V{_row_y(level + 1) - 2}", COLOURS["edge"]),
                   _text(LEFT + BOX_W / 2 + 8, y0 + 16, f"downsamplers.0 → {b.resampler[8:]}", 11),
                   _text(LEFT + BOX_W / 2 + 8, y0 + 30, f"{r.method}, padding {r.padding[0]}", 11)]
    for b in up:
        level = n - 1 - int(b.name.split(".")[1])
        el += _box(RIGHT, _row_y(level), b, COLOURS["up"])
        if b.resampler:
            y0 = _row_y(level)
            el += [_arrow(f"M{RIGHT + BOX_W / 2} {y0} V{_row_y(level - 1) + BOX_H + 2}", COLOURS["edge"]),
                   _text(RIGHT + BOX_W / 2 + 8, y0 - 44, f"upsamplers.0 → {b.resampler[6:]}", 11),
                   _text(RIGHT + BOX_W / 2 + 8, y0 - 30, "nearest x2, 3x3 conv", 11)]
    return el


def _bottom(blocks, down, up, n) -> list[str]:
    """The deepest level: through the mid block, or straight across when the UNet has none (SDXS)."""
    y = _row_y(n - 1) + BOX_H
    if "mid_block" not in blocks:
        return [_arrow(f"M{LEFT + BOX_W / 2} {y} C{LEFT + BOX_W / 2} {y + 60} {RIGHT + BOX_W / 2} {y + 60} "
                       f"{RIGHT + BOX_W / 2} {y + 2}", COLOURS["edge"]),
                _text((LEFT + RIGHT + BOX_W) / 2, y + 58, "no mid block", 12, anchor="middle")]
    mx, my = (LEFT + RIGHT) / 2, _row_y(n) - 10
    return _box(mx, my, blocks["mid_block"], COLOURS["mid"]) + [
        _arrow(f"M{LEFT + BOX_W / 2} {y} V{my + BOX_H / 2} H{mx - 2}", COLOURS["edge"]),
        _arrow(f"M{mx + BOX_W} {my + BOX_H / 2} H{RIGHT + BOX_W / 2} V{y + 2}", COLOURS["edge"])]


def _skips(report: ModelReport, n: int) -> list[str]:
    """One dashed arrow per (source block, up block) pair, labelled with each skip's channels."""
    groups: dict[tuple[str, str], list] = {}
    for s in report.unet.skips:
        src = "conv_in" if s.source == "conv_in" else ".".join(s.source.split(".")[:2])
        groups.setdefault((src, ".".join(s.target.split(".")[:2])), []).append(s)
    out = []
    for (src, dst), skips in groups.items():
        level = n - 1 - int(dst.split(".")[1])
        resnets = ", ".join(s.target.rsplit(".", 1)[1] for s in skips)
        label = f"{' + '.join(str(s.skip_channels) for s in skips)} ch → resnets.{resnets}"
        if src == "conv_in" or int(src.split(".")[1]) != level:  # the tensor entering this level
            y, x0 = _row_y(level) - 22, LEFT + BOX_W / 2
            d = (f"M{x0 + 4} {y} H{RIGHT - 30} Q{RIGHT - 12} {y} {RIGHT - 12} {y + 20} "
                 f"V{_row_y(level) + 24} H{RIGHT - 2}")
            who = "conv_in" if src == "conv_in" else f"{src}.downsamplers.0"
            out += [_arrow(d, COLOURS["skip"], True), _text(LEFT + BOX_W + 30, y - 5, f"{who}: {label}", 11,
                                                            fill="#666")]
        else:
            y = _row_y(level) + BOX_H * 0.62
            out += [_arrow(f"M{LEFT + BOX_W} {y} H{RIGHT - 2}", COLOURS["skip"], True),
                    _text(LEFT + BOX_W + 30, y - 6, f"{src}: {label}", 11, fill="#666")]
    return out


def _legend(y) -> list[str]:
    out = []
    for i, (kind, what) in enumerate((("self", "self-attention: queries and keys from the image tokens"),
                                      ("cross", "cross-attention: keys/values from the 77 text tokens"))):
        x = MARGIN + i * 480
        out += [f'<rect x="{x}" y="{y - 12}" width="16" height="16" rx="8" fill="{COLOURS[kind]}"/>',
                _text(x + 24, y + 1, what, 12)]
    return out


def unet_html(report: ModelReport) -> str:
    title = escape(f"{report.model} UNet at {report.resolution}x{report.resolution}")
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f'<body style="margin:16px">\n{unet_svg(report)}</body></html>\n')


def write_diagram(report: ModelReport, path) -> None:
    """Write the UNet picture as `.svg`, or as `.html` (the SVG inline in a page)."""

    path = Path(path)
    if path.suffix.lower() not in (".svg", ".html", ".htm"):
        raise FewstepError(f"--diagram {path}: the file name must end in .svg or .html")
    if report.unet is None:
        raise FewstepError(f"{report.model} has no UNet to draw")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unet_svg(report) if path.suffix.lower() == ".svg" else unet_html(report), encoding="utf-8")
