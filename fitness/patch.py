"""Apply candidates to a loaded Hugging Face model in place, and take them off again.

transformers models compute (cos, sin) once per forward in a rotary module (`model.model.rotary_emb`)
and hand them to every layer. We swap that module for `CandidateRotary`, which holds one or more
candidates and gives each batch row its own cos/sin. The original module is kept untouched, so
`restore()` is exact, and transformers' own per-forward updates (longrope short/long swap, dynamic
NTK) cannot overwrite our frequencies: they live in the module we took out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate, check_geometry
from fitness.geometry import RopeGeometry, geometry_from_config


class CandidateRotary(nn.Module):
    """Rotary module for K candidates. Row b of a batch uses candidate `b % K`;
    per row, long factors when the row's positions reach past the original window, short otherwise —
    the same rule as transformers' longrope, taken per row instead of per batch."""

    def __init__(self, candidates: Sequence[RopeCandidate], device=None):
        super().__init__()
        if not candidates:
            raise RopeSearchError("no candidates to apply")
        self.original_window = candidates[0].geometry.original_window
        self.register_buffer("short_inv_freq", torch.stack([c.inv_freq(long=False) for c in candidates]), False)
        self.register_buffer("long_inv_freq", torch.stack([c.inv_freq(long=True) for c in candidates]), False)
        self.register_buffer(
            "attention", torch.tensor([c.attention_factor for c in candidates], dtype=torch.float32), False
        )
        if device is not None:
            self.to(device)

    @property
    def num_candidates(self) -> int:
        return self.long_inv_freq.shape[0]

    def _row_candidates(self, batch: int) -> torch.Tensor:
        if batch % self.num_candidates and self.num_candidates > 1:
            raise RopeSearchError(f"batch of {batch} rows is not a multiple of {self.num_candidates} candidates")
        return torch.arange(batch, device=self.long_inv_freq.device) % self.num_candidates

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if position_ids.shape[0] == 1 and x.shape[0] > 1:
            position_ids = position_ids.expand(x.shape[0], -1)
        which = self._row_candidates(position_ids.shape[0])
        long = (position_ids.max(dim=1).values + 1 > self.original_window)[:, None]
        inv_freq = torch.where(long, self.long_inv_freq[which], self.short_inv_freq[which])
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq[:, None, :].to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = self.attention[which][:, None, None].to(x.device)
            cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every transformers rotary module of the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, CandidateRotary):
                raise RopeSearchError("candidates are already applied to this model; restore() first")
            if "Rotary" in type(child).__name__ and hasattr(child, "inv_freq"):
                found.append((parent, name, child))
    return found


_PINNED = "_ropesearch_geometry"


def pin_geometry(model: nn.Module) -> RopeGeometry:
    """Read the geometry once for a model whose config will not change (a scoring worker's), so every
    batch it applies reuses it instead of parsing the config again."""
    geometry = geometry_from_config(model.config)
    object.__setattr__(model, _PINNED, geometry)  # a plain attribute: not a module, parameter or buffer
    return geometry


def model_geometry(model: nn.Module) -> RopeGeometry:
    return getattr(model, _PINNED, None) or geometry_from_config(model.config)


class AppliedCandidates:
    """What `apply_candidates` returns: the new rotary module(s) and the way back."""

    def __init__(self, model: nn.Module, swapped: list[tuple[nn.Module, str, nn.Module]], rotary: CandidateRotary):
        self.model, self._swapped, self.rotary = model, swapped, rotary

    def restore(self) -> None:
        """Put the model's own rotary module(s) back, as they were."""
        for parent, name, original in self._swapped:
            setattr(parent, name, original)
        self._swapped = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def apply_candidates(model: nn.Module, candidates: RopeCandidate | Sequence[RopeCandidate]) -> AppliedCandidates:
    """Give `model` the candidates' RoPE (K candidates: row b uses candidate b % K) until `restore()`."""
    if isinstance(candidates, RopeCandidate):
        candidates = [candidates]
    geometry = model_geometry(model)
    for candidate in candidates:
        check_geometry(candidate, geometry, source=f"candidate {candidate.method!r}")
    swapped = _rotary_modules(model)
    if not swapped:
        raise RopeSearchError(f"{type(model).__name__} has no transformers rotary module to replace")
    device = swapped[0][2].inv_freq.device
    rotary = CandidateRotary(candidates, device=device)
    for parent, name, _ in swapped:
        setattr(parent, name, rotary)
    return AppliedCandidates(model, swapped, rotary)
