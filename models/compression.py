"""Learned compression of Sentinel-2 patches (D3.4 2.3): a learned block transform, scalar codes and a post-filter.

The serving contract is D3.4's: the compressor maps a normalised patch [N, 10, 120, 120] to INT64 codes
[N, 60, 60, 8] in 0..9,999 (``int64_latent32_15``), the decompressor maps codes back, and -1 marks a level that is
not used. Behind the contract (``services/core/transform_codes.py`` has the layout and the entropy prior):

- **Encoder**: every 8 x 8 block of the 10 bands (640 values, digital numbers) minus the corpus' mean block, projected
  on 128 learned orthonormal basis vectors (the principal directions of the training corpus' blocks, ordered by
  variance: a Karhunen-Loeve transform across bands and space, fitted by ``models.train_compressor``). Each
  coefficient is quantised with the base step (100 DN in the transform domain) into a code; level l holds
  coefficients 16 (l - 1) .. 16 l - 1 of every block.
- **Decoder**: the transpose of the basis (the exact inverse on the kept coefficients), plus the mean block, then a
  small residual convolutional post-filter trained to remove block edges and quantisation error. Its last
  convolution starts at zero, so an untrained filter is the identity.

Why not the residual vector quantiser D3.4 sketches: a 10,000-code level costs log2(10000) / 4 = 3.3 bits per pixel
before entropy coding, so any operating point at or below 4 bpp has one level, and a single 10,000-word vector
quantiser of 2 x 2 x 10 blocks stays far from JPEG 2000 on scenes it never saw (the measurements are in the model
card). Scalar codes of a decorrelating transform with a learned context prior reach low rates with a graceful
rate-distortion curve, and the rate is chosen per workflow, not per deployment.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from services.core import sentinel2
from services.core import transform_codes as layout

IN_BANDS = layout.BANDS
BLOCK = layout.BLOCK
BLOCK_VALUES = layout.BLOCK_VALUES
COEFFICIENTS = layout.COEFFICIENTS
CODEBOOK_LEVELS = layout.LEVELS
CODEBOOK_SIZE = layout.CODEBOOK_SIZE
UNUSED_LEVEL = layout.UNUSED_CODE
GRID = layout.BLOCKS_PER_SIDE
POST_FILTER_CHANNELS = 32

_BAND_MEAN = [sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER]
_BAND_STD = [sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER]


CONDITIONING = 2  # log2(quantiser scale) / 6 and levels / 8, as constant planes


class PostFilter(nn.Module):
    """Residual refinement of a decoded patch in normalised space: x + f(x, c), f = 3 convolutions, last one zero-init.

    ``c`` tells the filter how coarse the codes were (quantiser scale and levels, both read off the codes by
    ``decoder_conditioning``): the right correction for codes at the base step is nearly none, for coarse codes a
    strong smoothing of block edges; one filter without ``c`` has to compromise and hurts fine codes."""

    def __init__(self, bands: int = IN_BANDS, channels: int = POST_FILTER_CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(bands + CONDITIONING, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(channels, bands, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        planes = conditioning[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        hidden = F.relu(self.conv2(F.relu(self.conv1(torch.cat([x, planes], dim=1)))))
        return x + self.conv3(hidden)


def decoder_conditioning(q: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """[N, 2] from integer coefficients q [N, 15, 15, 128] (in base steps) and the mask of used ones.

    The quantiser scale s is the lattice the Wrapper requantised onto: every nonzero q is a multiple of s and, among
    the 28,800 coefficients of a patch, some equal +-s, so s = the smallest nonzero |q| (capped to 1..64; a patch
    with no nonzero coefficient gets 64, the coarsest). Levels = the used share of the 128 coefficients x 8."""
    magnitude = torch.where((q != 0) & used, q.abs(), torch.full_like(q, 1 << 20))
    scale = torch.clamp(magnitude.flatten(1).amin(dim=1), 1, 64).to(torch.float32)
    levels = used.to(torch.float32).flatten(1).mean(dim=1) * CODEBOOK_LEVELS
    return torch.stack([torch.log2(scale) / 6.0, levels / CODEBOOK_LEVELS], dim=1)


class BlockTransformCodec(nn.Module):
    """The trained object: band scaling, mean block, basis and post-filter (both served models are views of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band_mean", torch.tensor(_BAND_MEAN, dtype=torch.float32))
        self.register_buffer("band_std", torch.tensor(_BAND_STD, dtype=torch.float32))
        self.register_buffer("block_mean", torch.zeros(BLOCK_VALUES))
        self.register_buffer("basis", torch.zeros(BLOCK_VALUES, COEFFICIENTS))  # orthonormal columns
        self.post_filter = PostFilter()
        # The post-filter is applied to codes at this quantiser scale and coarser only: training sets it to the
        # finest scale from which the filter lowered the error at every checked operating point of development
        # scenes it never trained on (65 = never; 1 = always, the untrained identity filter).
        self.register_buffer("post_filter_min_scale", torch.tensor(1.0))

    # -- pieces shared by training and the served graphs

    def to_blocks(self, normalised: torch.Tensor) -> torch.Tensor:
        """[N, 10, 120, 120] normalised -> DN blocks [N, 15, 15, 640] (band, row, col inside a block)."""
        dn = normalised * self.band_std[:, None, None] + self.band_mean[:, None, None]
        n = dn.shape[0]
        return dn.reshape(n, IN_BANDS, GRID, BLOCK, GRID, BLOCK).permute(0, 2, 4, 1, 3, 5).reshape(
            n, GRID, GRID, BLOCK_VALUES)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """DN blocks [N, 15, 15, 640] -> normalised [N, 10, 120, 120]."""
        n = blocks.shape[0]
        dn = blocks.reshape(n, GRID, GRID, IN_BANDS, BLOCK, BLOCK).permute(0, 3, 1, 4, 2, 5).reshape(
            n, IN_BANDS, GRID * BLOCK, GRID * BLOCK)
        return (dn - self.band_mean[:, None, None]) / self.band_std[:, None, None]

    def analyse(self, normalised: torch.Tensor) -> torch.Tensor:
        """Transform coefficients [N, 15, 15, 128] (DN units) of normalised patches."""
        return (self.to_blocks(normalised) - self.block_mean) @ self.basis

    def synthesise(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Normalised patches of coefficients, before the post-filter."""
        return self.from_blocks(coefficients @ self.basis.T + self.block_mean)

    def decode(self, q: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """Normalised patches of integer coefficients q [N, 15, 15, 128] (base steps; 0 where not used)."""
        coefficients = q.to(torch.float32) * (used.to(torch.float32) * layout.BASE_STEP_DN)
        plain = self.synthesise(coefficients)
        conditioning = decoder_conditioning(q, used)
        # log2(scale) / 6 is the first conditioning value: compare in that space (no exp2 in ONNX opset 17).
        apply = (conditioning[:, 0] * 6.0 >= torch.log2(self.post_filter_min_scale) - 1e-3)[:, None, None, None]
        return torch.where(apply, self.post_filter(plain, conditioning), plain)


def coefficients_to_codes(q: torch.Tensor) -> torch.Tensor:
    """Integer coefficients [N, 15, 15, 128] -> codes [N, 60, 60, 8] (``transform_codes`` layout)."""
    n = q.shape[0]
    grouped = q.reshape(n, GRID, GRID, CODEBOOK_LEVELS, 4, 4).permute(0, 1, 4, 2, 5, 3)
    return grouped.reshape(n, GRID * 4, GRID * 4, CODEBOOK_LEVELS)


def codes_to_grouped(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, 60, 60, 8] -> [N, 15, 15, 128] in coefficient order."""
    n = codes.shape[0]
    grouped = codes.reshape(n, GRID, 4, GRID, 4, CODEBOOK_LEVELS).permute(0, 1, 3, 5, 2, 4)
    return grouped.reshape(n, GRID, GRID, COEFFICIENTS)


class Compressor(nn.Module):
    """Served: input_sentinel2_10_bands_120 [N, 10, 120, 120] -> int64_latent32_15 [N, 60, 60, 8]."""

    def __init__(self, codec: BlockTransformCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(self.codec.analyse(x) / layout.BASE_STEP_DN)
        codes = torch.clamp(q + layout.CODE_OFFSET, 0, CODEBOOK_SIZE - 1).to(torch.int64)
        return coefficients_to_codes(codes)


class Decompressor(nn.Module):
    """Served: int64_latent32_15 [N, 60, 60, 8] -> output_sentinel2_10_bands_120 [N, 10, 120, 120].

    A negative code (level not used) contributes a zero coefficient; a code above 9,999 (outside the contract)
    decodes as 9,999, the largest coefficient the compressor can produce."""

    def __init__(self, codec: BlockTransformCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        grouped = torch.clamp(codes_to_grouped(codes), max=CODEBOOK_SIZE - 1)
        used = grouped >= 0
        return self.codec.decode(torch.where(used, grouped - layout.CODE_OFFSET, torch.zeros_like(grouped)), used)


@torch.no_grad()
def fit_block_transform(codec: BlockTransformCodec, blocks: torch.Tensor) -> torch.Tensor:
    """Mean block and the 128 principal directions of DN blocks [M, 640] (float64 covariance); returns eigenvalues.

    Signs are fixed (largest |component| of each vector positive) so equal data gives equal weights."""
    data = blocks.to(torch.float64)
    mean = data.mean(dim=0)
    centred = data - mean
    covariance = centred.T @ centred / (len(data) - 1)
    values, vectors = torch.linalg.eigh(covariance)
    order = torch.argsort(values, descending=True)[:COEFFICIENTS]
    basis = vectors[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    codec.block_mean.copy_(mean.to(torch.float32))
    codec.basis.copy_((basis * signs).to(torch.float32))
    return values[order]
