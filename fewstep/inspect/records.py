"""What `fewstep inspect` finds, as plain records: layers (shapes, parameters, FLOPs, activation bytes),
blocks of layers, components, the totals per image, and the whole report that the renderers read."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import FewstepError

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per value of each dtype name


@dataclass
class Attn:
    kind: str  # "self" (queries and keys from the image), "cross" (keys from the text), "causal self" (CLIP)
    heads: int
    head_dim: int
    q_len: int
    kv_len: int


@dataclass
class Layer:
    """One module. `params` and `flops` are its own (sub-modules not included); FLOPs are for the batch."""

    name: str
    type: str
    params: int = 0
    flops: int = 0
    input_shape: tuple | None = None  # None: the module's forward is not called (e.g. CLIP's position table)
    output_shape: tuple | None = None
    activation_bytes: int = 0  # output tensor in the report's dtype
    kernel: tuple | None = None
    stride: tuple | None = None
    padding: tuple | str | None = None
    groups: int | None = None
    in_features: int | None = None  # channels, features or vocabulary
    out_features: int | None = None
    attention: Attn | None = None
    note: str = ""
    leaf: bool = True
    order: tuple = (0, 0)  # execution order; modules never called sit after their predecessor


@dataclass
class Block:
    """A subtotal unit: a UNet down/mid/up block, a CLIP layer, an autoencoder level ..."""

    name: str
    type: str
    input_shape: tuple | None
    output_shape: tuple | None
    params: int
    flops: int
    activation_bytes: int  # the block's output
    layers: list[Layer]


@dataclass
class Component:
    name: str  # "unet", "text_encoder", "text_encoder_2", "vae_decoder", "taesd_encoder", ...
    role: str  # "unet" | "text" | "decoder" | "encoder": what it is matched on by --compare
    type: str  # the module class
    folder: str  # the diffusers sub-folder whose state-dict keys the layer names are
    runs: str  # "per step" | "per image" | "img2img only"
    inputs: dict[str, tuple]
    blocks: list[Block]
    types: dict[str, str] = field(default_factory=dict, repr=False)  # every module name -> class

    @property
    def layers(self) -> list[Layer]:
        return [layer for b in self.blocks for layer in b.layers]

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def flops(self) -> int:
        return sum(b.flops for b in self.blocks)

    @property
    def param_bytes(self) -> dict[str, int]:
        return {k: self.params * v for k, v in ITEMSIZE.items()}

    @property
    def peak_activation_bytes(self) -> int:
        return max((layer.activation_bytes for layer in self.layers), default=0)


@dataclass
class Totals:
    """FLOPs per image (the batch's total / batch) for text-to-image with `steps` denoising steps."""

    steps: int
    params: int
    unet_step_flops: int  # one UNet call on the batch
    unet_step_flops_cfg: int  # with classifier-free guidance: batch x 2
    text_flops: int  # all text encoders, per image
    decoder_flops: int  # per image
    image_flops: int
    image_flops_cfg: int


@dataclass
class ModelReport:
    model: str
    description: str
    resolution: int
    latent: tuple[int, int]
    batch: int
    dtype: str
    components: list[Component]
    totals: Totals
    unet: object | None = None  # inspect_unet.UNetStructure: resamplers, skips, attention per level

    def component(self, name_or_role: str) -> Component:
        for c in self.components:
            if name_or_role in (c.name, c.role):
                return c
        raise FewstepError(f"{self.model} has no component '{name_or_role}' "
                           f"(it has {', '.join(c.name for c in self.components)})")
