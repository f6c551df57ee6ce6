"""Learned compression of Sentinel-2 patches (D3.4 2.3): convolutional autoencoder + residual vector quantisation.

Encoder (D3.4 2.3.4, Figure 7), downscaling factor 2:
  stride-2 convolution 10 -> 128 channels (120x120 -> 60x60), a convolutional core of 2 blocks x 3
  sub-blocks x 2 convolutions with ReLU and layer normalisation (over channels, per position: batch-size
  independent, the reason D3.4 replaced batch normalisation), residual skips within sub-blocks and
  around each block, then the closing standard convolution (the second "optional downscaling" slot,
  a plain convolution when dsf = 2).
Quantiser: residual VQ (Zeghidour et al. 2021), 8 codebooks x 10000 codes x 128 dims, greedy nearest
  code per level on the running residual; codes per position per level [N, 60, 60, 8] (int64).
Decoder: the mirror image (closing convolution, core, transposed stride-2 convolution 128 -> 10).
  A code of -1 (any negative code) marks an unused level: it contributes nothing, so one model
  decodes 1..8 levels (D3.4's "dynamic number of codebooks").

Untrained ("seeded-init") weights are chosen so the pipeline is already a working codec:
- identity autoencoder: the stride-2 kernel-2 convolution maps each 2x2x10 block (40 values) to 128
  channels through a seeded matrix with orthonormal columns; the decoder's transposed convolution uses
  the same weights (its exact left inverse); the closing convolutions are Dirac (identity) kernels and
  the last layer of every residual branch starts at zero (zero-init residual, Goyal et al. 2017), so
  D(E(x)) == x up to float error;
- codebooks from data (standard data-driven VQ initialisation): level l holds a seeded random sample
  of the distinct level-l residual vectors of the latents of bundled sample patches. From level 2 on,
  code 0 is the zero vector, so a further level never moves a latent away from its target.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IN_BANDS = 10
LATENT_CHANNELS = 128
DOWNSCALING_FACTOR = 2
CODEBOOK_LEVELS = 8
CODEBOOK_SIZE = 10000
UNUSED_LEVEL = -1
CORE_BLOCKS = 2
SUB_BLOCKS = 3


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of each position of an [N, C, H, W] map."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=1, keepdim=True)
        normalised = centred * torch.rsqrt(variance + self.eps)
        return normalised * self.weight[:, None, None] + self.bias[:, None, None]


class SubBlock(nn.Module):
    """Two 3x3 convolutions, each preceded by layer norm and ReLU (pre-activation), with a residual skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = ChannelLayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv1(F.relu(self.norm1(x)))
        branch = self.conv2(F.relu(self.norm2(branch)))
        return x + branch


class CoreBlock(nn.Module):
    """Three sub-blocks with a skip around the whole block.

    The block's branch is scaled per channel (LayerScale, Touvron et al. 2021) so that the zero-init
    rule applies to the block skip too: out = x + scale * subblocks(x), scale = 0 at initialisation.
    """

    def __init__(self, channels: int, sub_blocks: int = SUB_BLOCKS) -> None:
        super().__init__()
        self.sub_blocks = nn.Sequential(*(SubBlock(channels) for _ in range(sub_blocks)))
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale[:, None, None] * self.sub_blocks(x)


class ConvolutionalCore(nn.Sequential):
    def __init__(self, channels: int, blocks: int = CORE_BLOCKS) -> None:
        super().__init__(*(CoreBlock(channels) for _ in range(blocks)))


class Encoder(nn.Module):
    """[N, 10, 120, 120] (normalised) -> latent [N, 128, 60, 60]."""

    def __init__(self, in_bands: int = IN_BANDS, channels: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.downscale = nn.Conv2d(in_bands, channels, kernel_size=DOWNSCALING_FACTOR, stride=DOWNSCALING_FACTOR)
        self.core = ConvolutionalCore(channels)
        self.closing = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.closing(self.core(self.downscale(x)))


class Decoder(nn.Module):
    """latent [N, 128, 60, 60] -> [N, 10, 120, 120] (normalised space)."""

    def __init__(self, out_bands: int = IN_BANDS, channels: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.opening = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.core = ConvolutionalCore(channels)
        self.upscale = nn.ConvTranspose2d(
            channels, out_bands, kernel_size=DOWNSCALING_FACTOR, stride=DOWNSCALING_FACTOR
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.upscale(self.core(self.opening(latent)))


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2) for each row of ``vectors`` [M, D]; codebook [K, D].

    ||v - c||^2 = ||v||^2 - 2 v.c + ||c||^2, the cross term as one matmul. ||v||^2 is the same for every
    code of a row, so it is left out: the argmin is unchanged and float32 avoids a large cancellation.
    """
    # vector_norm (not (c * c).sum) so the exporter folds ||c||^2 into a [K] constant instead of
    # storing a squared copy of the codebook.
    code_norms = torch.linalg.vector_norm(codebook, dim=1).square()
    # One GEMM with the bias fused (ONNX Gemm, transB=1) over the codebook itself: no extra pass over
    # the [M, K] distance matrix and no transposed copy of the codebook in the exported graph.
    distances = F.linear(vectors * -2.0, codebook, code_norms)
    return torch.argmin(distances, dim=1)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, levels: int = CODEBOOK_LEVELS, size: int = CODEBOOK_SIZE, dim: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.levels, self.size, self.dim = levels, size, dim
        # One parameter per level (not one [levels, size, dim] tensor): the exported graph then uses each
        # codebook initializer directly; slicing a stacked tensor gets constant-folded into a copy per use.
        self.codebooks = nn.ParameterList(nn.Parameter(torch.zeros(size, dim)) for _ in range(levels))

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [N, D, H, W] -> codes [N, H, W, levels] (int64, each in [0, size))."""
        # Python ints: the exported Reshape gets a constant target shape, so the code dims stay static
        # (only the batch axis is dynamic).
        dim, height, width = (int(size) for size in latent.shape[1:])
        residual = latent.permute(0, 2, 3, 1).reshape(-1, dim)
        codes = []
        for level in range(self.levels):
            codebook = self.codebooks[level]
            index = nearest_code(residual, codebook)
            residual = residual - F.embedding(index, codebook)
            codes.append(index)
        return torch.stack(codes, dim=1).reshape(-1, height, width, self.levels)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, H, W, levels] -> latent [N, D, H, W]; a negative code adds nothing for its level.

        Negative codes are clamped to a valid index (so the lookup stays in range) and multiplied by
        a 0 mask; codes >= size are an error of the lookup, not silently clamped.
        """
        used = (codes >= 0).to(self.codebooks[0].dtype)
        index = torch.clamp(codes, min=0)
        latent = F.embedding(index[..., 0], self.codebooks[0]) * used[..., 0:1]
        for level in range(1, self.levels):
            latent = latent + F.embedding(index[..., level], self.codebooks[level]) * used[..., level : level + 1]
        return latent.permute(0, 3, 1, 2)

    def quantize(self, latent: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Quantised latent using the first ``levels`` levels (all by default)."""
        codes = self.encode(latent)
        if levels is not None:
            codes = mask_levels(codes, levels)
        return self.decode(codes)


def mask_levels(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Keep the first ``levels`` levels of codes [..., L]; the others become UNUSED_LEVEL."""
    out = codes.clone()
    out[..., levels:] = UNUSED_LEVEL
    return out


class CompressionAutoencoder(nn.Module):
    """The trained object: encoder, quantiser and decoder (both served models are views of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.quantizer = ResidualVectorQuantizer()
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor, levels: int = CODEBOOK_LEVELS) -> torch.Tensor:
        return self.decoder(self.quantizer.quantize(self.encoder(x), levels))


class Compressor(nn.Module):
    """Served: input_sentinel2_10_bands_120 [N, 10, 120, 120] -> int64_latent32_15 [N, 60, 60, 8]."""

    def __init__(self, autoencoder: CompressionAutoencoder) -> None:
        super().__init__()
        self.encoder = autoencoder.encoder
        self.quantizer = autoencoder.quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.encoder(x))


class Decompressor(nn.Module):
    """Served: int64_latent32_15 [N, 60, 60, 8] -> output_sentinel2_10_bands_120 [N, 10, 120, 120]."""

    def __init__(self, autoencoder: CompressionAutoencoder) -> None:
        super().__init__()
        self.quantizer = autoencoder.quantizer
        self.decoder = autoencoder.decoder

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode(codes))


@torch.no_grad()
def identity_init_(model: CompressionAutoencoder, generator: torch.Generator) -> None:
    """Make D(E(x)) == x before training (see the module docstring)."""
    encoder, decoder = model.encoder, model.decoder
    out_channels, in_bands, kh, kw = encoder.downscale.weight.shape
    block_values = in_bands * kh * kw
    if block_values > out_channels:
        raise ValueError("an identity autoencoder needs at least as many latent channels as values per block")
    gaussian = torch.randn(out_channels, block_values, generator=generator, dtype=torch.float64)
    orthonormal_columns, _ = torch.linalg.qr(gaussian)  # [128, 40], Q^T Q = I
    weight = orthonormal_columns.to(torch.float32).reshape(out_channels, in_bands, kh, kw)
    encoder.downscale.weight.copy_(weight)
    decoder.upscale.weight.copy_(weight)  # ConvTranspose2d weight [in=128, out=10, kh, kw]: the adjoint
    nn.init.zeros_(encoder.downscale.bias)
    nn.init.zeros_(decoder.upscale.bias)
    for closing in (encoder.closing, decoder.opening):
        nn.init.dirac_(closing.weight)
        nn.init.zeros_(closing.bias)
    for module in model.modules():
        if isinstance(module, SubBlock):
            _kaiming_(module.conv1.weight, generator)
            nn.init.zeros_(module.conv1.bias)
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)
        elif isinstance(module, CoreBlock):
            nn.init.zeros_(module.scale)


def _kaiming_(weight: torch.Tensor, generator: torch.Generator) -> None:
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    weight.copy_(torch.randn(weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)


@torch.no_grad()
def encode_latent_vectors(encoder: Encoder, patches: torch.Tensor, chunk: int = 6) -> torch.Tensor:
    """Latent vectors [N * 60 * 60, 128] of normalised patches [N, 10, 120, 120]."""
    latents = [encoder(patches[i : i + chunk]) for i in range(0, len(patches), chunk)]
    latent = torch.cat(latents)
    return latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])


@torch.no_grad()
def _nearest_code_chunked(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([nearest_code(vectors[i : i + chunk], codebook) for i in range(0, len(vectors), chunk)])


@torch.no_grad()
def init_codebooks_from_latents(
    quantizer: ResidualVectorQuantizer, latents: torch.Tensor, generator: torch.Generator
) -> None:
    """Level l: a seeded sample (without replacement) of the distinct level-l residuals of ``latents``.

    Levels >= 1 reserve code 0 for the zero vector, so greedy RVQ never increases a latent's error
    when a level is added (a sampled code can lie further from a residual than the origin does).
    """
    residual = latents.to(torch.float32).clone()
    for level in range(quantizer.levels):
        reserved = 0 if level == 0 else 1
        distinct = torch.unique(residual, dim=0)
        distinct = distinct[distinct.abs().amax(dim=1) > 0]
        wanted = quantizer.size - reserved
        if len(distinct) < wanted:
            raise ValueError(
                f"codebook level {level} needs {wanted} distinct residual vectors, the data has {len(distinct)}"
            )
        pick = torch.randperm(len(distinct), generator=generator)[:wanted]
        codebook = distinct[pick]
        if reserved:
            codebook = torch.cat([torch.zeros(1, quantizer.dim), codebook])
        quantizer.codebooks[level].copy_(codebook)
        residual = residual - codebook[_nearest_code_chunked(residual, codebook)]


def build_seeded_autoencoder(patches: torch.Tensor, seed: int) -> CompressionAutoencoder:
    """The documented untrained codec: identity autoencoder + codebooks from ``patches`` (normalised)."""
    generator = torch.Generator().manual_seed(seed)
    model = CompressionAutoencoder()
    identity_init_(model, generator)
    model.eval()
    latents = encode_latent_vectors(model.encoder, patches)
    init_codebooks_from_latents(model.quantizer, latents, generator)
    return model
