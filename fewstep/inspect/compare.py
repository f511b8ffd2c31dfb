"""`fewstep inspect A --compare B`: what differs between two inspected architectures.

Components are matched by role (UNet, each text encoder, decoder, encoder); two components of the same
class are compared block by block, anything else is reported as replaced. UNet blocks are matched by
resolution level, not by index: an up block's index counts from the deepest level, so SDXS-512's
`up_blocks.0` (16x16) is SD-Turbo's `up_blocks.1`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass

from .records import Block, Component, ModelReport
from .report import heading, si, table


@dataclass
class BlockChange:
    a: str  # block name in A ("" if added)
    b: str  # block name in B ("" if removed)
    change: str  # "removed" | "added" | "changed"
    params_a: int
    params_b: int
    flops_a: int
    flops_b: int
    detail: str


@dataclass
class ComponentChange:
    role: str
    a: str  # "unet (UNet)", "" when A has none
    b: str
    change: str  # "same" | "changed" | "replaced" | "removed" | "added"
    params_a: int
    params_b: int
    flops_a: int
    flops_b: int
    blocks: list[BlockChange]


@dataclass
class Comparison:
    a: str
    b: str
    resolution: tuple[int, int]
    components: list[ComponentChange]
    params_saved: int  # A - B, all components
    step_flops_saved: int  # UNet, one step, per image
    image_flops_saved: int  # text-to-image per image, without guidance


def _key(c: Component, name: str) -> str:
    """What a block is matched on: its level for UNet down/up blocks, else its name."""
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)", name):
        i = int(m.group(2))
        if m.group(1) == "up":
            i = sum(1 for b in c.blocks if b.name.startswith("up_blocks.")) - 1 - i
        return f"{m.group(1)} level {i}"
    return name


def structure(b: Block) -> str:
    """A block's make-up from its layer names: sub-module groups and their counts, and its channels."""
    groups: dict[str, int] = {}
    for layer in b.layers:
        if m := re.fullmatch(rf"{re.escape(b.name)}\.(\w+)\.\d+", layer.name):
            groups[m.group(1)] = groups.get(m.group(1), 0) + 1
    depth = sum(1 for layer in b.layers if re.fullmatch(rf"{re.escape(b.name)}\.attentions\.0\.transformer_blocks\.\d+",
                                                        layer.name))
    parts = [f"{k} {v}" for k, v in groups.items()] or [b.type]
    if depth > 1:
        parts.append(f"transformer depth {depth}")
    if b.output_shape and len(b.output_shape) > 1:
        parts.append(f"{b.input_shape[1] if b.input_shape and len(b.input_shape) > 2 else '?'}->{b.output_shape[1]} ch"
                     if len(b.output_shape) == 4 else f"width {b.output_shape[-1]}")
    return ", ".join(parts)


def _blocks(a: Component, b: Component) -> list[BlockChange]:
    ka, kb = {_key(a, x.name): x for x in a.blocks}, {_key(b, x.name): x for x in b.blocks}
    order = list(ka) + [k for k in kb if k not in ka]
    out = []
    for k in order:
        x, y = ka.get(k), kb.get(k)
        if x is None:
            out.append(BlockChange("", y.name, "added", 0, y.params, 0, y.flops, structure(y)))
        elif y is None:
            out.append(BlockChange(x.name, "", "removed", x.params, 0, x.flops, 0, structure(x)))
        elif (x.params, x.flops, structure(x)) != (y.params, y.flops, structure(y)):
            sx, sy = structure(x), structure(y)
            out.append(BlockChange(x.name, y.name, "changed", x.params, y.params, x.flops, y.flops,
                                   sx if sx == sy else f"{sx}  =>  {sy}"))
    return out


def _component(role: str, a: Component | None, b: Component | None) -> ComponentChange:
    def who(c):
        return f"{c.name} ({c.type})" if c else ""
    pa, fa = (a.params, a.flops) if a else (0, 0)
    pb, fb = (b.params, b.flops) if b else (0, 0)
    if a is None or b is None:
        return ComponentChange(role, who(a), who(b), "added" if a is None else "removed", pa, pb, fa, fb, [])
    if a.type != b.type:
        return ComponentChange(role, who(a), who(b), "replaced", pa, pb, fa, fb, [])
    blocks = _blocks(a, b)
    return ComponentChange(role, who(a), who(b), "changed" if blocks else "same", pa, pb, fa, fb, blocks)


def compare(a: ModelReport, b: ModelReport) -> Comparison:
    """A vs B; both should be inspected at the same resolution, batch and dtype."""
    ra, rb = {c.role: c for c in a.components}, {c.role: c for c in b.components}
    roles = list(ra) + [r for r in rb if r not in ra]
    components = [_component(r, ra.get(r), rb.get(r)) for r in roles]
    return Comparison(a.model, b.model, (a.resolution, b.resolution), components,
                      a.totals.params - b.totals.params,
                      (a.totals.unet_step_flops - b.totals.unet_step_flops) // a.batch,
                      a.totals.image_flops - b.totals.image_flops)


def _pct(saved: int, total: int) -> str:
    return f"{100 * saved / total:.1f}%" if total else ""


def render_compare(c: Comparison, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(asdict(c), indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["role", "a", "b", "change", "params_a", "params_b", "flops_a", "flops_b", "detail"])
        for comp in c.components:
            w.writerow([comp.role, comp.a, comp.b, comp.change, comp.params_a, comp.params_b, comp.flops_a,
                        comp.flops_b, ""])
            for x in comp.blocks:
                w.writerow([comp.role, x.a, x.b, x.change, x.params_a, x.params_b, x.flops_a, x.flops_b, x.detail])
        return buf.getvalue()
    md = fmt == "md"
    res = c.resolution[0] if c.resolution[0] == c.resolution[1] else c.resolution
    parts = [(f"# {c.a} vs {c.b}" if md else f"{c.a} vs {c.b}") + f" at {res}x{res}; saved = A - B"]
    pa = sum(x.params_a for x in c.components)
    ua = next((x.flops_a for x in c.components if x.role == "unet"), 0)
    parts.append(heading("Saved", md) + "\n\n" + table(["", "saved", "of A"], [
        ["parameters", f"{c.params_saved:,}", _pct(c.params_saved, pa)],
        ["UNet FLOPs per step", si(c.step_flops_saved), _pct(c.step_flops_saved, ua)],
        ["text-to-image FLOPs per image", si(c.image_flops_saved), ""]], md))
    parts.append(heading("Components", md) + "\n\n" + table(
        ["role", "A", "B", "change", "params", "saved", "FLOPs", "FLOPs saved"],
        [[x.role, x.a, x.b, x.change, f"{x.params_a:,} -> {x.params_b:,}", f"{x.params_a - x.params_b:,}",
          f"{si(x.flops_a)} -> {si(x.flops_b)}", si(x.flops_a - x.flops_b)] for x in c.components], md))
    for x in c.components:
        if x.blocks:
            parts.append(heading(f"{x.role}: blocks removed, added or changed", md) + "\n\n" + table(
                ["A", "B", "change", "params", "FLOPs", "structure (A => B)"],
                [[y.a, y.b, y.change, f"{y.params_a:,} -> {y.params_b:,}", f"{si(y.flops_a)} -> {si(y.flops_b)}",
                  y.detail] for y in x.blocks], md))
    return "\n\n".join(parts) + "\n"
