"""`fewstep inspect`: every layer of a model family with its shapes, parameters, FLOPs and activation
size at a given resolution, measured without weights.

The modules are built on the meta device (no memory, no init) and run once on meta tensors; forward
hooks on every module inside a block record input and output shapes, in execution order. FLOPs are
counted analytically, multiply and add as 2, for the operations `torch.utils.flop_counter` counts
(convolutions, matmuls, attention): conv 2 * N*Cout*Hout*Wout * Cin/groups * kh*kw, linear 2 * tokens *
in * out, attention 2 * 2 * B*heads*Lq*Lk*d for QK^T and AV (causal masks are not discounted, as there).
Norms, activations and resampling are not counted. The inspect tests check the totals against
FlopCounterMode. Layer names are the state-dict prefixes inside the component's diffusers folder.

Text-to-image cost: the UNet runs once per denoising step, the text encoders and the decoder once per
image; classifier-free guidance runs the UNet (and the text encoders) on twice the batch, which
doubles their FLOPs exactly, so the report gives totals with and without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewstepError
from ..models.clip import CLIPAttention
from ..models.layers import Attention, Downsample2D, Upsample2D, VAEAttention, unfolded
from .build import plans
from .families import Family, family
from .records import ITEMSIZE, Attn, Block, Component, Layer, ModelReport, Totals
from .unet import unet_structure

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- measuring one module --------------------------------------------------------------------------


def _tensor(obj):
    """The first tensor in a module's arguments or result (CLIP returns a NamedTuple)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(_tensor, obj) if t is not None), None)
    if isinstance(obj, dict):
        return _tensor(list(obj.values()))
    return None


def _attention(m: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> Attn | None:
    if isinstance(m, Attention):
        ctx = args[1] if len(args) > 1 else kwargs.get("context")
        kv = x.shape[1] if ctx is None else ctx.shape[1]
        return Attn("self" if ctx is None else "cross", m.heads, x.shape[-1] // m.heads, x.shape[1], kv)
    if isinstance(m, VAEAttention):  # single head over the H*W pixels
        return Attn("self", 1, x.shape[1], x.shape[2] * x.shape[3], x.shape[2] * x.shape[3])
    if isinstance(m, CLIPAttention):
        return Attn("causal self", m.num_heads, x.shape[-1] // m.num_heads, x.shape[1], x.shape[1])
    return None


def _describe(layer: Layer, m: nn.Module) -> None:
    """Fill the structural fields of a layer from its module."""
    if isinstance(m, nn.Conv2d):
        layer.kernel, layer.stride, layer.groups = tuple(m.kernel_size), tuple(m.stride), m.groups
        layer.padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        layer.in_features, layer.out_features = m.in_channels, m.out_channels
    elif isinstance(m, nn.Linear):
        layer.in_features, layer.out_features = m.in_features, m.out_features
    elif isinstance(m, nn.Embedding):
        layer.in_features, layer.out_features = m.num_embeddings, m.embedding_dim
    elif isinstance(m, nn.GroupNorm):
        layer.groups, layer.in_features, layer.out_features = m.num_groups, m.num_channels, m.num_channels
    elif isinstance(m, nn.LayerNorm):
        layer.in_features = layer.out_features = m.normalized_shape[-1]
    elif isinstance(m, Downsample2D):
        layer.note = "3x3 conv, stride 2" + (" (pads right/bottom by 1 first)" if m.asymmetric else "")
    elif isinstance(m, Upsample2D):
        layer.note = "nearest x2, then 3x3 conv"
    elif isinstance(m, nn.Upsample):
        layer.note = f"{m.mode} x{m.scale_factor:g}"


def _measured(name: str, m: nn.Module, args: tuple, kwargs: dict, out, itemsize: int) -> Layer:
    x = _tensor(args) if args else _tensor(kwargs)
    y = _tensor(out)
    layer = Layer(name, type(m).__name__, leaf=next(m.children(), None) is None,
                  params=sum(p.numel() for p in m.parameters(recurse=False)))
    _describe(layer, m)
    if y is None:  # never called: structure and parameters only
        return layer
    layer.input_shape = tuple(x.shape) if x is not None else None
    layer.output_shape, layer.activation_bytes = tuple(y.shape), y.numel() * itemsize
    if isinstance(m, nn.Conv2d):
        layer.flops = 2 * y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    elif isinstance(m, nn.Linear):
        layer.flops = 2 * (x.numel() // m.in_features) * m.in_features * m.out_features
    elif (att := _attention(m, x, args, kwargs)) is not None:
        layer.attention = att
        layer.flops = 2 * 2 * x.shape[0] * att.heads * att.q_len * att.kv_len * att.head_dim
    return layer


def _like(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(x)


# Shape-only stand-ins, on meta tensors only, for the functions whose meta kernels are Python reference
# implementations (0.7-4 ms a call: half the time of an SDXL inspection). Each returns what torch would:
# same shape and dtype. No FLOPs are lost: they are computed from the hooks' shapes, never from running.
SHAPE_ONLY = {
    "group_norm": _like, "layer_norm": _like, "gelu": _like,
    "linear": lambda x, w, b=None: x.new_empty((*x.shape[:-1], w.shape[0])),
    "scaled_dot_product_attention": lambda q, k, v, *a, **kw: q.new_empty((*q.shape[:-1], v.shape[-1])),
}


@contextmanager
def shape_only():
    """Swap the SHAPE_ONLY functions into torch.nn.functional (where nn modules and fewstep's models
    look them up on every call) for meta inputs; everything is restored on exit."""
    saved = {name: getattr(F, name) for name in SHAPE_ONLY}

    def patched(name):
        return lambda x, *a, **kw: (SHAPE_ONLY if x.is_meta else saved)[name](x, *a, **kw)
    for name in SHAPE_ONLY:
        setattr(F, name, patched(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def measure(model: nn.Module, run: Callable[[], object], blocks: str, itemsize: int) -> list[Block]:
    """Run `run()` (a forward of `model` on meta tensors) with hooks on every module inside a block
    (`blocks`: a name pattern); returns the blocks with their layers in execution order."""
    pattern = re.compile(rf"({blocks})(\.|$)")
    inside = {name: m for name, m in model.named_modules() if pattern.match(name)}
    order: dict[str, int] = {}
    layers: dict[str, Layer] = {}

    def pre(name, m, args, kwargs):
        order.setdefault(name, len(order))

    def post(name, m, args, kwargs, out):
        if name in layers:  # a module called twice: count its work twice, keep the first shapes
            layers[name].flops += _measured(name, m, args, kwargs, out, itemsize).flops
        else:
            layers[name] = _measured(name, m, args, kwargs, out, itemsize)
    handles = []
    for name, m in inside.items():
        handles.append(m.register_forward_pre_hook(lambda *a, n=name: pre(n, *a), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda *a, n=name: post(n, *a), with_kwargs=True))
    try:  # the model's math (published counts), not the folded upsampling convs fewstep runs
        with torch.no_grad(), shape_only(), unfolded():
            run()
    finally:
        for h in handles:
            h.remove()
    key = (0, 0)
    for name, m in inside.items():  # definition order: a module never called sorts after the one before it
        if name in layers:
            key = (order[name], 0)
        else:
            layers[name] = _measured(name, m, (), {}, None, itemsize)
            key = (key[0], key[1] + 1)
        layers[name].order = key
    return _group(sorted(layers.values(), key=lambda layer: layer.order), pattern)


def _group(layers: list[Layer], pattern: re.Pattern) -> list[Block]:
    by_block: dict[str, list[Layer]] = {}
    for layer in layers:
        by_block.setdefault(pattern.match(layer.name).group(1), []).append(layer)
    out = []
    for name, members in by_block.items():
        head = next(layer for layer in members if layer.name == name)
        out.append(Block(name, head.type, head.input_shape, head.output_shape, sum(m.params for m in members),
                         sum(m.flops for m in members), head.activation_bytes, members))
    return out


def _totals(components: list[Component], batch: int, steps: int) -> Totals:
    def flops(role_prefix: str) -> int:
        return sum(c.flops for c in components if c.role.startswith(role_prefix))
    unet, text, dec = flops("unet"), flops("text"), flops("decoder")
    return Totals(steps=steps, params=sum(c.params for c in components), unet_step_flops=unet,
                  unet_step_flops_cfg=2 * unet, text_flops=text // batch, decoder_flops=dec // batch,
                  image_flops=(text + steps * unet + dec) // batch,
                  image_flops_cfg=(2 * text + steps * 2 * unet + dec) // batch)


def inspect_model(model: str | Path | Family, resolution: int | None = None, batch: int = 1,
                  dtype: str = "fp16", steps: int = 1) -> ModelReport:
    """Inspect a built-in family (`families.BUILTINS`), a shipped model or a path, at
    `resolution` (default: the UNet's training size) for a batch of `batch` images in `dtype`."""
    fam = model if isinstance(model, Family) else family(model)
    res = resolution or fam.resolution
    if res <= 0 or res % fam.latent_scale:
        raise FewstepError(f"resolution {res} is not a positive multiple of {fam.latent_scale}")
    if batch < 1 or steps < 1:
        raise FewstepError("batch and steps must be at least 1")
    if dtype not in DTYPES:
        raise FewstepError(f"unknown dtype '{dtype}' (use one of {', '.join(DTYPES)})")
    components = []
    for p in plans(fam, res, batch, DTYPES[dtype]):
        types = {n: type(m).__name__ for n, m in p.module.named_modules()}
        components.append(Component(p.name, p.role, type(p.module).__name__, p.folder, p.runs,
                                    {k: tuple(v.shape) for k, v in p.inputs.items()},
                                    measure(p.module, p.call, p.blocks, ITEMSIZE[dtype]), types))
    report = ModelReport(str(model if not isinstance(model, Family) else model.name), fam.description, res,
                         (res // fam.latent_scale,) * 2, batch, dtype, components, _totals(components, batch, steps))
    if fam.unet is not None:
        report.unet = unet_structure(report.component("unet"), fam.unet)
    return report
