"""Modality encoders: a spec string (built-in name, local directory or hub name) -> an encoder.

Every encoder is an `nn.Module` with `modality`, `dim`, `spec`, `preprocess(raw_list)`,
`forward(batch, capture_attention=False) -> ModalityTokens` (True, or a list of layers), `encode(raw_list)`,
`config_dict()` and `save_pretrained(dir)`.
"""

from multimodal.encoders.registry import BUILTINS, build_encoder, encoder_from_config, register_builtin
from multimodal.encoders.text import TextEncoder  # noqa: E402  (imports register the built-ins)
from multimodal.encoders.image import ImageEncoder  # noqa: E402
from multimodal.encoders.audio import AudioEncoder  # noqa: E402

__all__ = ["AudioEncoder", "BUILTINS", "ImageEncoder", "TextEncoder", "build_encoder", "encoder_from_config",
           "register_builtin"]
