"""Stream outputs to codes: the one definition used by training, evaluation, tools and serving.

A query is encoded by the trained network(s) (docs/design.md §2, evaluation): `f` = sign(f(x)),
`g` = sign(g(x)), `fg` = sign(f(x) + g(x)). A zero output maps to −1, everywhere. Encoding runs
in eval mode under no_grad, in batches, on uint8 images; the outputs come back as float32 on
the CPU whatever the device, so that codes made on a GPU and on a CPU compare bit for bit where
the float results do.
"""

from __future__ import annotations

import numpy as np
import torch

from dadh_dist.config import ENCODERS

__all__ = ["ENCODERS", "available", "encode", "query_codes", "stream_outputs"]


def available(two_streams: bool) -> tuple[str, ...]:
    """The encoders a model with one stream (`f`) or two (`f`, `g`, `fg`) offers."""
    return ENCODERS if two_streams else ("f",)


def encode(module: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int,
           amp: bool = False) -> torch.Tensor:
    """One stream's real-valued outputs: uint8 images (N, C, H, W) -> (N, k) float32 on the CPU."""
    outs = []
    was_training = module.training
    module.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        for start in range(0, images.shape[0], batch):
            x = images[start : start + batch].to(device, non_blocking=True)
            outs.append(module(x).float().cpu())
    module.train(was_training)
    if not outs:
        return torch.zeros(0, module.head.out_features)
    return torch.cat(outs)


def stream_outputs(f: torch.nn.Module, g: torch.nn.Module | None, images: torch.Tensor,
                   encoders, device: torch.device, batch: int, amp: bool = False,
                   ) -> dict[str, torch.Tensor]:
    """The outputs `query_codes` needs for `encoders`: f's, and g's where an encoder uses g."""
    needs = {s for e in encoders for s in ("f", "g") if s in e}
    if "g" in needs and g is None:
        raise ValueError("encoder g or fg needs the second stream; this model has one")
    streams = {"f": f, "g": g}
    return {name: encode(streams[name], images, device, batch, amp) for name in sorted(needs)}


def query_codes(outputs: dict[str, torch.Tensor], encoder: str) -> np.ndarray:
    """±1 int8 codes (N, k) from stream outputs: sign(f), sign(g) or sign(f + g)."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    x = outputs["f"] if encoder == "f" else outputs["g"] if encoder == "g" else (
        outputs["f"] + outputs["g"])
    return torch.where(x > 0, 1, -1).to(torch.int8).numpy()
