"""Records what really ran inside a U-Net: per forward call, the shape of the sample its first layer saw (after
the CFG stop's hook halved the batch), the timestep and which leaf modules really ran (a skipped module still
fires its own pre-hook, so leaves inside it are watched)."""

from __future__ import annotations

import torch


class UNetRecorder:
    def __init__(self, unet: torch.nn.Module, watch: list[str] | None = None):
        self.calls: list[dict] = []
        self.handles = [unet.register_forward_pre_hook(self._on_unet, with_kwargs=True),
                        unet.conv_in.register_forward_pre_hook(self._on_conv_in)]
        names = watch if watch is not None else [n for n, m in unet.named_modules() if n.endswith((".conv1", "attn2.to_q", "downsamplers.0.conv", "upsamplers.0.conv"))]
        for name in names:
            module = unet.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._ran(name)))

    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append({"shape": tuple(sample.shape), "t": int(timestep), "ran": []})

    def _on_conv_in(self, module, args):
        self.calls[-1]["shape"] = tuple(args[0].shape)

    def _ran(self, name: str):
        def hook(module, args):
            if self.calls:
                self.calls[-1]["ran"].append(name)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
