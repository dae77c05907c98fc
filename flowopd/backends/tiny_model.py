"""The built-in tiny text-to-image model of the toy world.

A pixel-space conv U-Net (32 -> 16 -> 8) with FiLM conditioning on the noise
level and the pooled prompt, cross-attention to the prompt tokens at 16x16 and
8x8, self-attention at 8x8, and two coordinate channels at the input (text is
always centred, so absolute position matters). We picked it by measurement: a
patch-4 DiT of the same size drew fragments after 40 CPU-minutes while a U-Net
drew clean flat shapes after 10 (see the foundation issue's notes).

The prompt encoder reads any string: grammar words (with an unknown-word
token), and the characters of quoted text, each tagged with its slot relative
to the string's centre, the layout the world uses to centre signs. With
`roles` (configs/toy_pretrain_order.yaml) each word also gets a role embedding: first object,
connective, second object; see TextEncoder.roles.
`pooled_text=False` drops the pooled prompt from the FiLM (the prompt then acts
through cross-attention only) and `xattn_full` adds cross-attention at 32x32.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

WORDS = (
    "a an and two three four square squares circle circles triangle triangles "
    "red green blue yellow purple left right of above below sign that says"
).split()
CONNECTIVES = ("and", "left", "right", "of", "above", "below")  # words between two objects
ATTRIBUTE_WORDS = ("two three four square squares circle circles triangle triangles "
                   "red green blue yellow purple").split()  # what an object is: its count, shape, colour
CHARS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
PAD, NULL, UNK, UNK_CHAR, QUOTE = 0, 1, 2, 3, 4
N_SPECIAL = 5
MAX_TOKENS = 24
MAX_QUOTED = 8  # quoted characters kept; slots run from -(MAX_QUOTED-1) to MAX_QUOTED-1


@dataclass
class TinyConfig:
    channels: tuple[int, int, int] = (32, 64, 96)
    text_dim: int = 96
    text_layers: int = 2
    heads: int = 4
    groups: int = 8
    cond_dim: int = 128
    roles: bool = False  # add a learned role embedding to each word token (see TextEncoder.roles)
    # FiLM on the pooled prompt (a bag of its tokens) with the noise level; off: only the noise level,
    # so that what the prompt says reaches the image through cross-attention alone, place by place
    pooled_text: bool = True
    # cross-attention to the prompt at 32x32 too (after down1 and up1), not only at 16x16 and 8x8
    xattn_full: bool = False
    # 1: the U-Net works on pixels, levels 32x32, 16x16, 8x8 (`channels` three widths). 2: on 2x2
    # patches (pixel_unshuffle, as a patch-2 DiT does), levels 16x16 and 8x8 (`channels` two widths;
    # xattn_full must be off): about 2.2x cheaper a sample at channels (48, 96)
    patch: int = 1

    def __post_init__(self):
        if self.patch not in (1, 2):
            raise ValueError(f"patch must be 1 or 2, got {self.patch!r}")
        if len(self.channels) != (3 if self.patch == 1 else 2):
            raise ValueError(f"patch {self.patch} takes {3 if self.patch == 1 else 2} channel widths, "
                             f"got {list(self.channels)}")
        if self.patch == 2 and self.xattn_full:
            raise ValueError("xattn_full is the 32x32 level's cross-attention: patch 2 has no 32x32 level")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyConfig":
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


class Tokenizer:
    """prompt string -> (ids, slots), both (MAX_TOKENS,) long; slot 0 is 'no slot'."""

    vocab = {w: N_SPECIAL + i for i, w in enumerate(WORDS)}
    char_base = N_SPECIAL + len(WORDS)
    size = char_base + len(CHARS)
    n_slots = 1 + MAX_TOKENS + (2 * MAX_QUOTED - 1)

    def encode(self, prompt: str | None) -> tuple[list[int], list[int]]:
        if prompt is None:  # the unconditional (CFG) prompt
            ids, slots = [NULL], [1]
        else:
            ids, slots = [], []
            parts = str(prompt).split('"')
            for k, part in enumerate(parts):
                if k % 2 == 0:  # outside quotes: words
                    for w in re.findall(r"[a-z]+|\S", part.lower()):
                        ids.append(self.vocab.get(w, UNK))
                        slots.append(1 + min(len(ids) - 1, MAX_TOKENS - 1))
                else:  # quoted text: characters with centre-relative slots
                    ids.append(QUOTE)
                    slots.append(1 + min(len(ids) - 1, MAX_TOKENS - 1))
                    chars = part[:MAX_QUOTED]
                    n = len(chars)
                    for i, c in enumerate(chars):
                        ids.append(self.char_base + CHARS.index(c) if c in CHARS else UNK_CHAR)
                        # offset from the centre in half-glyph units: 2i-(n-1) in [-(M-1), M-1]
                        slots.append(1 + MAX_TOKENS + (2 * i - (n - 1) + MAX_QUOTED - 1))
            if not ids:
                ids, slots = [UNK], [1]
        ids, slots = ids[:MAX_TOKENS], slots[:MAX_TOKENS]
        pad = MAX_TOKENS - len(ids)
        return ids + [PAD] * pad, slots + [0] * pad

    def batch(self, prompts: list[str | None], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        enc = [self.encode(p) for p in prompts]
        ids = torch.tensor([e[0] for e in enc], dtype=torch.long, device=device)
        slots = torch.tensor([e[1] for e in enc], dtype=torch.long, device=device)
        return ids, slots


class TextEncoder(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        d = cfg.text_dim
        self.tok = nn.Embedding(Tokenizer.size, d)
        self.slot = nn.Embedding(Tokenizer.n_slots + MAX_QUOTED, d)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        # text_layers 0: no mixing between tokens, each keeps its own (word + slot + role) embedding
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False) if cfg.text_layers else None
        self.norm = nn.LayerNorm(d)
        self.role = nn.Embedding(3, d) if cfg.roles else None
        self.register_buffer("connectives", torch.tensor([Tokenizer.vocab[w] for w in CONNECTIVES]), persistent=False)

    def roles(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T) role of each token: 0 before the first connective word (the first object),
        1 a connective ("and", "left of", "above", ...), 2 after one (the second object). A stand-in for
        what a language-pretrained encoder gives real models: which noun a word belongs to."""
        conn = torch.isin(ids, self.connectives)
        after = conn.long().cumsum(1) > 0
        return torch.where(conn, 1, torch.where(after, 2, 0))

    def forward(self, ids: torch.Tensor, slots: torch.Tensor):
        """ids, slots (B, T) -> tokens (B, T, d), pad mask (B, T) True where padded, pooled (B, d)."""
        pad = ids == PAD
        h = self.tok(ids) + self.slot(slots)
        if self.role is not None:
            h = h + self.role(self.roles(ids))
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=pad)
        h = self.norm(h)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return h, pad, pooled


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of sigma * 1000 (the SD3 timestep convention). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = (sigma.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over image positions; keys from the image (self) or the prompt (cross)."""

    def __init__(self, dim: int, ctx_dim: int | None, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(ctx_dim or dim, dim)
        self.to_v = nn.Linear(ctx_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x, ctx=None, ctx_pad=None):
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        src = h if ctx is None else ctx
        q = self.to_q(h).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        k = self.to_k(src).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        v = self.to_v(src).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        mask = None if ctx_pad is None else (~ctx_pad)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = self.to_out(o.transpose(1, 2).reshape(b, -1, c))
        return x + o.transpose(1, 2).view(b, c, hgt, wid)


class TinyUNet(nn.Module):
    """velocity(x (B,3,32,32), sigma (B,), ids, slots) -> v (B,3,32,32)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        g, cd, td = cfg.groups, cfg.cond_dim, cfg.text_dim
        self.text = TextEncoder(cfg)
        self.sigma_mlp = nn.Sequential(nn.Linear(cd, cd), nn.SiLU(), nn.Linear(cd, cd))
        if cfg.pooled_text:
            self.pool_proj = nn.Linear(td, cd)
        if cfg.patch == 2:  # 2x2 patches (pixel_unshuffle: 12 values a position, + its coordinates)
            c2, c3 = cfg.channels
            self.conv_in = nn.Conv2d(14, c2, 3, padding=1)
            self._inner_levels(c2, c3)
            c_out, side, out_ch = c2, 16, 12
        else:
            c1, c2, c3 = cfg.channels
            self.conv_in = nn.Conv2d(5, c1, 3, padding=1)
            self.down1 = ResBlock(c1, c1, cd, g)
            if cfg.xattn_full:
                self.xattn1 = Attention(c1, td, cfg.heads, g)
                self.xattn_up1 = Attention(c1, td, cfg.heads, g)
            self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
            self._inner_levels(c2, c3)
            self.unpool1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
            self.up1 = ResBlock(2 * c1, c1, cd, g)
            c_out, side, out_ch = c1, 32, 3
        self.norm_out = nn.GroupNorm(g, c_out)
        self.conv_out = nn.Conv2d(c_out, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def _inner_levels(self, c2: int, c3: int):
        """The 16x16 and 8x8 levels (cross-attention at both, self-attention at 8x8), shared by both
        layouts (built in this order, so that a seed gives the weights it always gave)."""
        g, cd, td, heads = self.cfg.groups, self.cfg.cond_dim, self.cfg.text_dim, self.cfg.heads
        self.down2 = ResBlock(c2, c2, cd, g)
        self.xattn2 = Attention(c2, td, heads, g)
        self.pool2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.down3 = ResBlock(c3, c3, cd, g)
        self.sattn3 = Attention(c3, None, heads, g)
        self.xattn3 = Attention(c3, td, heads, g)
        self.mid = ResBlock(c3, c3, cd, g)
        self.up3 = ResBlock(2 * c3, c3, cd, g)
        self.xattn_up3 = Attention(c3, td, heads, g)
        self.unpool2 = nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1)
        self.up2 = ResBlock(2 * c2, c2, cd, g)
        self.xattn_up2 = Attention(c2, td, heads, g)

    def encode(self, ids, slots):
        return self.text(ids, slots)

    def forward(self, x, sigma, cond):
        """cond = (tokens (B,T,d), pad (B,T), pooled (B,d)) from encode()."""
        tokens, pad, pooled = cond
        c = self.sigma_mlp(sigma_embedding(sigma, self.cfg.cond_dim))
        if self.cfg.pooled_text:
            c = c + self.pool_proj(pooled)
        c = F.silu(c)
        patches = self.cfg.patch == 2
        h = F.pixel_unshuffle(x, 2) if patches else x
        h = self.conv_in(torch.cat([h, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1))
        if patches:
            h = self._inner_forward(h, c, tokens, pad)
        else:  # the 32x32 level around the inner ones
            s1 = self.down1(h, c)
            if self.cfg.xattn_full:
                s1 = self.xattn1(s1, tokens, pad)
            h = self._inner_forward(self.pool1(s1), c, tokens, pad)
            h = self.unpool1(h)
            h = self.up1(torch.cat([h, s1], 1), c)
            if self.cfg.xattn_full:
                h = self.xattn_up1(h, tokens, pad)
        v = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(v, 2) if patches else v

    def _inner_forward(self, h, c, tokens, pad):
        """16x16 in, 16x16 out, through the 8x8 level."""
        s2 = self.xattn2(self.down2(h, c), tokens, pad)
        h = self.pool2(s2)
        s3 = self.xattn3(self.sattn3(self.down3(h, c)), tokens, pad)
        h = self.mid(s3, c)
        h = self.xattn_up3(self.up3(torch.cat([h, s3], 1), c), tokens, pad)
        h = self.unpool2(h)
        return self.xattn_up2(self.up2(torch.cat([h, s2], 1), c), tokens, pad)
