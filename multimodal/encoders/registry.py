"""One registry per modality: a spec string resolves to a built encoder in one function.

A spec is, in this order: a registered built-in name, an existing local directory (written
by the encoder's `save_pretrained` or by the backing library), or a hub name loaded through
the library's own loader. Adding an encoder is adding an entry:

    @register_builtin("text", "bert-tiny-scenes")
    def bert_tiny_scenes(**overrides) -> TextEncoder: ...

Each modality's encoder class registers itself with `@register_encoder(modality)` and
provides `from_directory(path, **overrides)`, `from_hub(name, **overrides)` and
`from_config(d, tokenizer_dir=None)`.
"""

from __future__ import annotations

import json
import os
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from multimodal.types import MODALITIES, InputError

BUILTINS: dict[str, dict[str, Callable[..., nn.Module]]] = {m: {} for m in MODALITIES}
ENCODERS: dict[str, type] = {}  # modality -> encoder class


def register_builtin(modality: str, name: str):
    """Decorator: register `factory(**overrides) -> encoder` as built-in `name` of `modality`."""
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BUILTINS[modality][name] = factory
        return factory
    return wrap


def describe_spec(modality: str, spec: str) -> str:
    """A built-in encoder in words (the first sentence of its factory's docstring); any other spec
    as where it comes from."""
    factory = BUILTINS[modality].get(spec)
    if factory is not None and factory.__doc__:
        first = " ".join(factory.__doc__.split())
        return first.split(". ")[0].rstrip(".")
    return "loaded from a local folder" if Path(str(spec)).is_dir() else "a pretrained model from the hub"


def register_encoder(modality: str):
    """Class decorator: the encoder class that loads directories, hub names and configs."""
    def wrap(cls: type) -> type:
        ENCODERS[modality] = cls
        return cls
    return wrap


def _encoder_class(modality: str) -> type:
    if modality not in ENCODERS:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    return ENCODERS[modality]


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def build_encoder(modality: str, spec: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Built-in name, local directory or hub name -> encoder (an `nn.Module`)."""
    cls = _encoder_class(modality)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise InputError(f"{modality} encoder spec must be a non-empty string, got {spec!r}")
    spec = str(spec).strip()
    if spec in BUILTINS[modality]:
        try:
            return BUILTINS[modality][spec](**overrides)
        except TypeError as e:  # an argument this built-in does not take
            raise InputError(f"the built-in {modality} encoder '{spec}' does not take {sorted(overrides)} "
                             f"({_reason(e)})") from None
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            return cls.from_directory(path, **overrides)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"could not load a {modality} encoder from directory {path} ({_reason(e)}); "
                             f"it should hold files written by the encoder's save_pretrained") from None
    try:
        return cls.from_hub(spec, **overrides)
    except InputError:
        raise
    except Exception as e:
        builtins = ", ".join(sorted(BUILTINS[modality])) or "none"
        raise InputError(
            f"unknown {modality} encoder spec '{spec}': not a built-in ({builtins}), not a local directory, "
            f"and could not be loaded from the hub ({_reason(e)}). Use a built-in name, the path of a saved "
            f"encoder, or a hub model name with network access (and HF_HUB_OFFLINE unset)") from None


def encoder_from_config(modality: str, d: Mapping[str, Any], tokenizer_dir: str | os.PathLike | None = None
                        ) -> nn.Module:
    """Rebuild an encoder's architecture (random weights) from its `config_dict()`."""
    cls = _encoder_class(modality)
    if not isinstance(d, Mapping) or d.get("modality", modality) != modality:
        raise InputError(f"this is not a {modality} encoder config: {str(d)[:200]}")
    try:
        return cls.from_config(dict(d), tokenizer_dir=tokenizer_dir)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"could not rebuild the {modality} encoder from its config ({_reason(e)}); "
                         "the config is damaged or from another version") from None


# ---------------------------------------------------------------------------------------
# Helpers shared by the transformers-backed encoders (text, audio)
# ---------------------------------------------------------------------------------------


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch a transformers model to eager attention so it returns weights.

    transformers 5 returns no weights under SDPA; the previous implementation is restored.
    """
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def layer_subset(capture: bool | Sequence[int], num_layers: int) -> list[int] | None:
    """A `capture_attention` list of layers as sorted, distinct indices (negative ones count from the
    end); None when `capture` is True or False (every layer or none)."""
    if isinstance(capture, bool):
        return None
    if not isinstance(capture, Sequence) or not all(isinstance(l, int) and not isinstance(l, bool) for l in capture):
        raise InputError(f"capture_attention={capture!r}: use True, False or a list of layer indices")
    bad = [l for l in capture if not -num_layers <= l < num_layers]
    if bad:
        raise InputError(f"capture_attention asks for layer(s) {bad} but the encoder has {num_layers} "
                         f"(0..{num_layers - 1}, or negative from the end)")
    return sorted({l % num_layers for l in capture})


def attention_modules(model: nn.Module) -> list[nn.Module] | None:
    """A transformers encoder's self-attention module per layer, in layer order: the modules whose
    weights eager `output_attentions` records (`_can_record_outputs`); None if that is not one per layer."""
    spec = getattr(model, "_can_record_outputs", None) or {}
    cls = getattr(spec.get("attentions"), "target_class", spec.get("attentions"))
    if not isinstance(cls, type):
        return None
    found = [m for m in model.modules() if isinstance(m, cls)]
    return found if len(found) == model.config.num_hidden_layers else None


def eager_weights(q: Tensor, k: Tensor, scaling: float, mask: Tensor | None) -> Tensor:
    """softmax(q k^T * scaling + mask), (B, H, N, N), op for op as transformers' eager attention.

    A boolean (SDPA) mask becomes eager's additive one as `masking_utils.eager_mask` makes it (0 /
    dtype min). Without autograd recording, one (B, H, N, N) tensor is allocated and updated in place.
    """
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), device=mask.device, dtype=q.dtype), torch.finfo(q.dtype).min)
    if torch.is_grad_enabled():
        w = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, N, N)
        return torch.softmax(w if mask is None else w + mask, dim=-1)
    w = torch.matmul(q, k.transpose(2, 3)).mul_(scaling)  # (B, H, N, N)
    if mask is not None:
        w.add_(mask)
    return torch.softmax(w, dim=-1, out=w)


# The attention modules a `layer_attention` block captures: module -> (layer, where its weights go, batch rows)
_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[int, Tensor], Sequence[int] | None]]" = \
    weakref.WeakKeyDictionary()


def capture_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              **kwargs) -> tuple[Tensor, None]:
    """A transformers attention function (registered as CAPTURE_ATTENTION): SDPA in every module but the
    ones a `layer_attention` block captures, which take the eager path and keep its weights.

    q/k/v are (B, H, N, hd); returns (B, N, H, hd) as every attention function does. With batch `rows`,
    only those rows take the eager path (the others stay SDPA) and only their weights are kept.
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if module not in _CAPTURES:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer, maps, rows = _CAPTURES[module]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if rows is not None:  # SDPA for the batch, then eager for the rows whose weights are kept
        fused = sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)[0]
        one_mask = attention_mask is None or attention_mask.shape[0] == 1
        query, key, value = query[rows], key[rows], value[rows]  # (b, H, N, hd)
        attention_mask = attention_mask if one_mask else attention_mask[rows]
    w = eager_weights(query, key, scaling, attention_mask)  # (b, H, N, N)
    maps[layer] = w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()  # (b, N, H, hd)
    if rows is not None:
        out = fused.index_copy(0, torch.as_tensor(rows, device=out.device), out)  # (B, N, H, hd)
    return out, None


CAPTURE_ATTENTION = "multimodal_layer_capture"
AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # SDPA's masks


@contextmanager
def layer_attention(model: nn.Module, modules: Sequence[nn.Module], layers: Sequence[int],
                    rows: Sequence[int] | None = None) -> Iterator[dict[int, Tensor] | None]:
    """Switch only `layers` of an SDPA model to the eager path and collect their weights `{layer: (B, heads, N, N)}`.

    transformers has no per-layer attention implementation, so the model runs CAPTURE_ATTENTION
    (`capture_attention_forward`, through transformers' `AttentionInterface`): SDPA with SDPA's masks in
    every layer, eager in the listed ones. Yields None, changing nothing, if the model cannot switch.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    if model.config._attn_implementation != CAPTURE_ATTENTION:  # a model without the attention interface
        yield None
        return
    maps: dict[int, Tensor] = {}
    for l in layers:
        _CAPTURES[modules[l]] = (l, maps, rows)
    try:
        yield maps
    finally:
        for l in layers:
            _CAPTURES.pop(modules[l], None)
        model.set_attn_implementation(previous)


def local_attention_mask(near: Tensor, num_prefix: int) -> Tensor:
    """`(N, N)` bool self-attention mask (True: may attend), N = num_prefix + P, for encoders whose patches
    attend only near themselves: `near (P, P)` says which patches each patch attends to, and nothing else,
    not even the prefix (CLS) tokens; the prefix tokens attend to everything (they pool, no patch reads
    them back), so what a patch token holds stays about its neighbourhood at any depth."""
    n = num_prefix + near.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool, device=near.device)
    mask[:num_prefix] = True
    mask[num_prefix:, num_prefix:] = near
    return mask


def forward_with_attention(model: nn.Module, inputs: Mapping[str, Tensor], capture: bool | Sequence[int],
                           rows: Sequence[int] | None = None) -> tuple[Any, list[Tensor] | None]:
    """`model(**inputs)` and the self-attention weights `capture_attention` asks for, per layer (B, heads, N, N).

    False: none. True: every layer, transformers' eager `output_attentions` (the whole model switched
    to eager for the call). A list of layers: only those, in layer order, as eager computes them, while
    the other layers stay on SDPA (`layer_attention`); a model that is not on SDPA or cannot switch
    falls back to eager `output_attentions` and keeps the listed layers. `rows`: only those batch rows.
    """
    layers = layer_subset(capture, model.config.num_hidden_layers)
    if capture is False or layers == []:
        return model(**inputs), None
    modules = None if layers is None or model.config._attn_implementation != "sdpa" else attention_modules(model)
    if modules is not None:
        with layer_attention(model, modules, layers, rows) as maps:
            if maps is not None:
                return model(**inputs), [maps[l] for l in layers]
    with eager_attention(model):
        out = model(**inputs, output_attentions=True)
    maps = list(out.attentions or ()) if layers is None else [out.attentions[l] for l in layers]
    return out, (maps if rows is None else [a[rows] for a in maps])


def json_config(config) -> dict:
    """A transformers config as a JSON-safe dict (every field, not just the diff)."""
    return json.loads(config.to_json_string(use_diff=False))


def config_from_json(d: Mapping[str, Any]):
    """Inverse of `json_config`: the right transformers config class for `model_type`."""
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path")}
    return AutoConfig.for_model(d.pop("model_type"), **d)
