"""Int8 denoisers under PostDiff: torchao's weight-only and dynamic int8 quantization of the denoiser.

Names (the `--quantize` values): "int8-weight" is torchao's `Int8WeightOnlyConfig` (int8 weights, float
activations), "int8-dynamic" its `Int8DynamicActivationInt8WeightConfig` (activations quantized per call, an
int8 x int8 matmul). Both replace the weights of the denoiser's `nn.Linear` layers with torchao tensors and
keep every module, so PostDiff's hooks (DeepCache, block caching, the cross-attention and text-stream
caches) and the external caches wrap a quantized denoiser exactly as a float one, applied before or after
the quantization; convolutions (most of a U-Net's weights) stay in float.

Two ways in, the same torchao configs:
- loading a checkpoint: `pipeline_quantization_config(name, "transformer")` is diffusers' own
  `PipelineQuantizationConfig` for `from_pretrained(..., quantization_config=...)` (its `TorchAoConfig`);
- a pipeline already in memory (the embedded models, tests): `quantize_denoiser(pipe, name)`, in place.

Refused before anything changes: an unknown name, torchao missing, a compiled denoiser (compile after
quantizing: the graphs guard on the weights they were traced with) and a denoiser already quantized (by this
module, by diffusers' loader, or by another backend).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .config import ConfigError

QUANTIZATIONS = {"int8-weight": "Int8WeightOnlyConfig", "int8-dynamic": "Int8DynamicActivationInt8WeightConfig"}
INSTALL_HINT = 'pip install "postdiff[quantization]" (torchao)'


def check_quantization(name: str) -> None:
    if name not in QUANTIZATIONS:
        raise ConfigError(f"quantize={name!r} is not allowed: expected one of {', '.join(QUANTIZATIONS)}")


def torchao_config(name: str):
    """torchao's config object for `name`."""
    check_quantization(name)
    try:
        from torchao import quantization
    except ImportError:
        raise ConfigError(f"quantize={name!r} needs torchao, which is not installed: {INSTALL_HINT}") from None
    return getattr(quantization, QUANTIZATIONS[name])()


def pipeline_quantization_config(name: str, component: str):
    """diffusers' `PipelineQuantizationConfig` quantizing `component` ("unet", "transformer") with `name`, for
    `DiffusionPipeline.from_pretrained(..., quantization_config=...)`."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    return PipelineQuantizationConfig(quant_mapping={component: TorchAoConfig(torchao_config(name))})


def denoiser_name(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def quantization_of(module: torch.nn.Module) -> str:
    """The quantization of `module`'s linear weights: one of QUANTIZATIONS, "other" (a backend or scheme this
    module does not name, e.g. diffusers' bitsandbytes or quanto loaders), or "" (float)."""
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(layer, torch.nn.Linear) and weight is not None and type(weight) is not torch.nn.Parameter:
            return _torchao_name(weight) or "other"
    return "other" if getattr(module, "is_quantized", False) else ""


def _torchao_name(weight) -> str:
    """int8-weight or int8-dynamic for a torchao Int8Tensor (whether it quantizes activations), else ""."""
    if type(weight).__name__ != "Int8Tensor":
        return ""
    return "int8-dynamic" if getattr(weight, "act_quant_kwargs", None) is not None else "int8-weight"


def quantize_denoiser(pipe, name: str) -> None:
    """Quantize `pipe`'s denoiser in place with `name` (see the module docstring for what is refused)."""
    _quantize(getattr(pipe, denoiser_name(pipe)), name, in_place=True)


def _quantize(module: torch.nn.Module, name: str, in_place: bool) -> torch.nn.Module:
    """`module` quantized with `name` (in place, or a quantized copy), after the checks, before any change."""
    config = torchao_config(name)
    _check_quantizable(module, name)
    from torchao.quantization import quantize_

    target = module if in_place else copy.deepcopy(module)  # a copy: a second set of weights while it is used
    quantize_(target, config)
    return target


def _check_quantizable(denoiser: torch.nn.Module, name: str) -> None:
    from .compiling import is_compiled

    if is_compiled(denoiser):
        raise ConfigError(f"quantize={name!r}: the denoiser is compiled; quantize it first, then compile it")
    current = quantization_of(denoiser)
    if current:
        raise ConfigError(f"quantize={name!r}: the denoiser is already quantized ({current}); load it in float to "
                          "quantize it again")


@contextlib.contextmanager
def quantized(pipe, name: str):
    """`pipe` with a quantized copy of its denoiser for the duration (the float one back afterwards): how the
    sweep scores a quantized point beside float ones on one loaded pipeline. "" leaves `pipe` as it is."""
    if not name:
        yield
        return
    attribute = denoiser_name(pipe)
    original = getattr(pipe, attribute)
    setattr(pipe, attribute, _quantize(original, name, in_place=False))
    try:
        yield
    finally:
        setattr(pipe, attribute, original)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers hold: a torchao tensor counts its int8 data and its scales."""
    return sum(_tensor_bytes(tensor) for tensor in (*module.parameters(), *module.buffers()))


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:  # a torchao tensor without a zero point (symmetric int8)
        return 0
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, inner)) for inner in names)
    return tensor.numel() * tensor.element_size()
