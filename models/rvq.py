"""The D3.4 2.3 VQ-VAE with residual vector quantisation (RVQ): the seed's compressor, served as a second codec.

Contract (contracts doc section 5, card ``codec: "residual-vq/1"``): the compressor maps a standardised patch
[N, 10, 120, 120] to INT64 codes [N, 60, 60, 8] (``int64_latent32_15``), one codebook index in 0..9,999 per latent
position and level, all 8 levels always; the decompressor maps codes back and reads -1 as "level not used" (the
Wrapper keeps the first L levels, format 1 of ``services/wrapper/outputs/compressed.py``).

Architecture (D3.4 Figure 7, our reading of it):

- **Encoder**: a stride-2 3 x 3 convolution 10 -> 128 (the optional downscaling, dsf 2: 120 x 120 -> 60 x 60), a
  convolutional core of two blocks of three sub-blocks, each sub-block two 3 x 3 convolutions (128 channels) with
  LayerNorm and ReLU before each and a residual skip around it, a residual skip around each block, and a closing
  3 x 3 convolution (the document's second, stride-1 "optional downscaling" position) that also projects
  128 -> ``CODE_DIM`` channels, the space the codebooks live in.
- **Quantiser**: 8 levels of 10,000 code vectors of ``CODE_DIM`` = 32 values. Level l quantises the residual the
  levels before it left; decoding the first L levels sums their code vectors.
- **Decoder**: the mirror: 3 x 3 convolution ``CODE_DIM`` -> 128, the same core, a stride-2 transposed convolution
  128 -> 10 back to 120 x 120.

Choices the document leaves open, and why:

- LayerNorm normalises each pixel over its 128 channels (not over the whole feature map): the statistics do not
  depend on the image size, so a model trained on crops behaves the same on full patches and the result of one
  patch never depends on the others in a batch (the reason D3.4 dropped BatchNorm).
- ``CODE_DIM`` = 32: the codebooks are 8 x 10,000 x 32 = 2.56 M values (5.1 MB in fp16) beside 3.6 M convolution
  weights, so the committed fp16 checkpoint stays near 12 MB (a fresh clone downloads it). 128-dimensional codes
  would be 10.2 M values (20 MB) for a quantiser that, at 13.3 bits per level and position, cannot carry 128
  dimensions' worth of detail anyway.
- Codebooks are updated by exponential moving averages of the residuals assigned to them (no gradient), with a
  commitment loss on the encoder; codes unused for ``DEAD_AFTER_STEPS`` training steps are re-seeded from the
  current batch's residuals of that level. Codebooks are initialised from sampled residuals of a continuous
  (unquantised) warm-up, level by level. Together these keep all 10,000 codes of a level in use (collapse is the
  failure D3.4 2.3.4 reports for its first VQ-VAE variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IN_BANDS = 10
PATCH = 120
CHANNELS = 128
CODE_DIM = 32
LEVELS = 8
CODEBOOK_SIZE = 10_000
UNUSED_CODE = -1
DOWNSCALING = 2
GRID = PATCH // DOWNSCALING
SUB_BLOCKS = 3
BLOCKS = 2
DEAD_AFTER_STEPS = 100


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel ([N, C, H, W]; mean and variance over C)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=1, keepdim=True)
        return centred * torch.rsqrt(variance + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class SubBlock(nn.Module):
    """x + conv(relu(norm(conv(relu(norm(x)))))): two convolutions with LayerNorm and ReLU, residual skip."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class Block(nn.Module):
    """Three sub-blocks with a residual skip around all of them."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.sub_blocks = nn.Sequential(*(SubBlock(channels) for _ in range(SUB_BLOCKS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sub_blocks(x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.downscale = nn.Conv2d(IN_BANDS, CHANNELS, 3, stride=DOWNSCALING, padding=1)
        self.core = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.norm = ChannelLayerNorm(CHANNELS)
        self.project = nn.Conv2d(CHANNELS, CODE_DIM, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu(self.norm(self.core(self.downscale(x)))))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(CODE_DIM, CHANNELS, 3, padding=1)
        self.core = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.norm = ChannelLayerNorm(CHANNELS)
        self.upscale = nn.ConvTranspose2d(CHANNELS, IN_BANDS, 4, stride=DOWNSCALING, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upscale(F.relu(self.norm(self.core(self.expand(z)))))


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest code vector (squared Euclidean) for vectors [M, D] in codebook [K, D]."""
    norms = (codebook * codebook).sum(dim=1)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # one product: a chunk loop would be unrolled for the traced batch size and break dynamic batches
        return torch.argmin(norms[None, :] - 2.0 * vectors @ codebook.T, dim=1)
    parts = [torch.argmin(norms[None, :] - 2.0 * vectors[i:i + chunk] @ codebook.T, dim=1)
             for i in range(0, vectors.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class ResidualQuantiser(nn.Module):
    """8 codebooks of 10,000 code vectors; EMA statistics and last-use steps are training state (buffers)."""

    def __init__(self, levels: int = LEVELS, size: int = CODEBOOK_SIZE, dim: int = CODE_DIM) -> None:
        super().__init__()
        self.register_buffer("codebooks", torch.randn(levels, size, dim) * 0.01)
        # Training statistics only (not in the served state dict: the checkpoint stays small).
        self.register_buffer("ema_count", torch.ones(levels, size), persistent=False)
        self.register_buffer("ema_sum", self.codebooks.clone(), persistent=False)
        self.register_buffer("last_used", torch.zeros(levels, size, dtype=torch.int64), persistent=False)

    def training_statistics(self) -> dict[str, torch.Tensor]:
        return {"ema_count": self.ema_count, "ema_sum": self.ema_sum, "last_used": self.last_used}

    def load_training_statistics(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    def quantise(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vectors [M, D] -> (indices [M, levels], cumulative reconstructions [levels, M, D], residuals in
        [levels, M, D]: residuals[l] is what level l quantised)."""
        residual = flat
        total = torch.zeros_like(flat)
        indices, cumulative, residuals = [], [], []
        for level in range(self.levels):
            index = nearest_code(residual, self.codebooks[level])
            chosen = self.codebooks[level][index]
            residuals.append(residual)
            total = total + chosen
            residual = residual - chosen
            indices.append(index)
            cumulative.append(total)
        return torch.stack(indices, dim=1), torch.stack(cumulative), torch.stack(residuals)

    def dequantise(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., levels] (-1 = level not used) -> the sum of the used levels' code vectors [..., D]."""
        used = codes >= 0
        safe = torch.clamp(codes, 0, self.codebooks.shape[1] - 1)
        out = torch.zeros((*codes.shape[:-1], self.codebooks.shape[2]), dtype=self.codebooks.dtype,
                          device=codes.device)
        for level in range(self.levels):
            vectors = F.embedding(safe[..., level], self.codebooks[level])
            out = out + vectors * used[..., level, None].to(vectors.dtype)
        return out

    @torch.no_grad()
    def ema_update(self, indices: torch.Tensor, residuals: torch.Tensor, step: int, decay: float,
                   generator: torch.Generator) -> int:
        """EMA codebook update from one batch; re-seeds codes unused for ``DEAD_AFTER_STEPS`` steps with random
        residuals of the batch (a little noise so twins split). Returns how many codes were re-seeded."""
        reseeded = 0
        size, dim = self.codebooks.shape[1], self.codebooks.shape[2]
        for level in range(self.levels):
            index, vectors = indices[:, level], residuals[level]
            count = torch.bincount(index, minlength=size).to(vectors.dtype)
            sums = torch.zeros(size, dim, dtype=vectors.dtype, device=vectors.device).index_add_(0, index, vectors)
            hit = count > 0
            self.last_used[level][hit] = step
            self.ema_count[level].mul_(decay).add_(count, alpha=1 - decay)
            self.ema_sum[level].mul_(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            n = self.ema_count[level].sum()
            smoothed = (self.ema_count[level] + 1e-5) / (n + size * 1e-5) * n
            updated = self.ema_sum[level] / smoothed[:, None]
            self.codebooks[level][hit] = updated[hit]
            dead = torch.nonzero(step - self.last_used[level] > DEAD_AFTER_STEPS).flatten()
            if dead.numel():
                dead = dead[:vectors.shape[0]]
                pick = torch.randint(vectors.shape[0], (dead.numel(),), generator=generator).to(vectors.device)
                seeds = vectors[pick] + 0.01 * vectors.std() * torch.randn(dead.numel(), dim, generator=generator).to(
                    vectors.device)
                self.codebooks[level][dead] = seeds
                self.ema_sum[level][dead] = seeds
                self.ema_count[level][dead] = 1.0
                self.last_used[level][dead] = step
                reseeded += int(dead.numel())
        return reseeded

    @torch.no_grad()
    def initialise(self, flat: torch.Tensor, generator: torch.Generator) -> None:
        """Codebooks from sampled residuals of vectors [M, D], level by level (data-sampled initialisation)."""
        residual = flat
        for level in range(self.levels):
            pick = torch.randperm(residual.shape[0], generator=generator)[:self.codebooks.shape[1]].to(flat.device)
            if pick.numel() < self.codebooks.shape[1]:
                extra = torch.randint(residual.shape[0], (self.codebooks.shape[1] - pick.numel(),),
                                      generator=generator).to(flat.device)
                pick = torch.cat([pick, extra])
            seeds = residual[pick]
            seeds = seeds + 0.01 * residual.std() * torch.randn(seeds.shape, generator=generator).to(flat.device)
            self.codebooks[level].copy_(seeds)
            self.ema_sum[level].copy_(seeds)
            self.ema_count[level].fill_(1.0)
            residual = residual - self.codebooks[level][nearest_code(residual, self.codebooks[level])]


class ResidualVQCodec(nn.Module):
    """The trained object: encoder, residual quantiser, decoder (both served models are views of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.quantiser = ResidualQuantiser()
        self.decoder = Decoder()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 10, H, W] -> latent vectors [N, H/2, W/2, CODE_DIM]."""
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [N, h, w, CODE_DIM] -> [N, 10, 2h, 2w]."""
        return self.decoder(latent.permute(0, 3, 1, 2))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.encode(x)
        indices, _, _ = self.quantiser.quantise(latent.reshape(-1, latent.shape[-1]))
        return indices.reshape(*latent.shape[:-1], self.quantiser.levels)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.quantiser.dequantise(codes))


class RVQCompressor(nn.Module):
    """Served: input_sentinel2_10_bands_120 [N, 10, 120, 120] -> int64_latent32_15 [N, 60, 60, 8], all levels."""

    def __init__(self, codec: ResidualVQCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.codes(x).to(torch.int64)


class RVQDecompressor(nn.Module):
    """Served: int64_latent32_15 [N, 60, 60, 8] (-1 = level not used) -> output_sentinel2_10_bands_120.

    Any negative code counts as "not used"; a code above 9,999 (outside the contract) reads as 9,999."""

    def __init__(self, codec: ResidualVQCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.reconstruct(codes)


def keep_levels(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes with levels ``levels + 1 ..`` set to -1 (what the Wrapper's format 1 keeps at ``levels``)."""
    kept = torch.arange(codes.shape[-1], device=codes.device) < levels
    return torch.where(kept, codes, torch.full_like(codes, UNUSED_CODE))


@dataclass(frozen=True)
class LevelUsage:
    level: int  # 1-based
    used_fraction: float  # distinct codes seen / codebook size
    perplexity: float  # 2 ** entropy of the code histogram (bits); 10,000 = every code equally often
    entropy_bits: float


def codebook_usage(codes: torch.Tensor | np.ndarray, size: int = CODEBOOK_SIZE) -> list[LevelUsage]:
    """Per-level usage of codes [..., levels]: the share of the codebook used and the perplexity."""
    flat = torch.as_tensor(codes).reshape(-1, codes.shape[-1])
    rows = []
    for level in range(flat.shape[1]):
        column = flat[:, level]
        column = column[column >= 0]
        counts = torch.bincount(column, minlength=size).to(torch.float64)
        total = counts.sum()
        p = counts[counts > 0] / total if total > 0 else counts[:0]
        entropy = float(-(p * torch.log2(p)).sum()) if p.numel() else 0.0
        rows.append(LevelUsage(level + 1, float((counts > 0).sum()) / size, math.pow(2.0, entropy), entropy))
    return rows
