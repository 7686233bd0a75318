"""Text encoder: a transformers model + fast tokenizer (BERT family first).

Tokens are the last hidden state; geometry holds each token's string and character span
in the (stripped) input text, so highlights land on the right characters.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer

from multimodal.encoders.registry import (
    config_from_json, forward_with_attention, json_config, register_builtin, register_encoder)
from multimodal.io import check_text
from multimodal.types import InputError, ModalityTokens, TextGeometry

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# The scenes vocabulary: whole words of the caption grammar, then characters and "##" pieces
# so that any ASCII word still tokenizes (into pieces); anything else becomes [UNK].
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SCENE_WORDS = """
red green blue yellow orange purple white black cyan magenta pink brown gray grey
circle square triangle star cross diamond ring hexagon small large big medium tiny
tone tones beep chirp rising falling noise burst click clicks train high low mid pitch whistle hum sweep
a an the and then with of on in left right top bottom above below followed by after before
is there sound image picture shows plays first second
""".split()


# Words and marks that join phrases: with phrase pooling each stays a query of its own, and the
# content tokens between two of them (a noun phrase such as "a large red circle") share one query.
PHRASE_BREAKS = frozenset("and or then with followed by after before while , ; . : ! ?".split())


def phrase_groups(tokens: Sequence[str], content: Sequence[bool]) -> list[int]:
    """Per token, its phrase number (0, 1, ...), or -1 for special tokens, padding and joining words.

    A phrase is a maximal run of content tokens between joining words (`PHRASE_BREAKS`); a
    word-piece ("##...") always stays with the word it continues.
    """
    groups, current, open_phrase = [], -1, False
    for i, (tok, c) in enumerate(zip(tokens, content)):
        continues = tok.startswith("##")
        next_continues = i + 1 < len(tokens) and tokens[i + 1].startswith("##")
        if not c or (tok in PHRASE_BREAKS and not next_continues and not continues):
            groups.append(-1)
            open_phrase = False
            continue
        if not open_phrase:
            current, open_phrase = current + 1, True
        groups.append(current)
    return groups


def _batch_groups(tokens: Sequence[Sequence[str]], content: Tensor) -> Tensor:
    """(B, N) `phrase_groups` per caption, from its token strings and (B, N) content mask (on the CPU)."""
    rows = content.tolist()
    return torch.tensor([phrase_groups(t, c) for t, c in zip(tokens, rows)], dtype=torch.long).view(len(rows), -1)


def batch_phrase_groups(batch: dict[str, Any]) -> Tensor:
    """(B, N) `phrase_groups` of a preprocessed batch (its token strings and content mask)."""
    return _batch_groups(batch["geometry"].tokens, batch["attention_mask"].bool() & ~batch["special"])


def text_phrase_groups(text: ModalityTokens) -> Tensor:
    """(B, N) `phrase_groups` of encoded text (on the CPU)."""
    return _batch_groups(text.geometry.tokens, text.mask & ~text.special)


def phrase_member(text: ModalityTokens) -> Tensor:
    """(B, N) bool: the text tokens inside a phrase (`phrase_groups` >= 0), not CLS / SEP, padding or joining words."""
    return text_phrase_groups(text) >= 0


def pool_phrases(hidden: Tensor, groups: Tensor) -> Tensor:
    """(B, N, D) tokens, (B, N) phrase numbers -> each phrase's tokens replaced by the phrase mean."""
    if not bool((groups >= 0).any()):
        return hidden
    member = torch.nn.functional.one_hot(groups.clamp_min(0), int(groups.max()) + 1).to(hidden.dtype)
    member = member * (groups >= 0)[..., None].to(hidden.dtype)  # (B, N, G)
    means = member.transpose(1, 2) @ hidden / member.sum(1)[..., None].clamp_min(1)  # (B, G, D)
    return torch.where((groups >= 0)[..., None], member @ means, hidden)  # (B, N, D)


def scenes_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits)
    pieces = SPECIAL_TOKENS + SCENE_WORDS + chars + list(string.punctuation) + ["##" + c for c in chars]
    return list(dict.fromkeys(pieces))  # de-duplicated, order kept


def scenes_tokenizer(max_length: int = 64) -> BertTokenizer:
    """Lower-casing WordPiece tokenizer over `scenes_vocab()`, built offline."""
    vocab = {tok: i for i, tok in enumerate(scenes_vocab())}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_length)


BUILTIN_TOKENIZERS = {"bert-tiny-scenes": scenes_tokenizer}


@register_encoder("text")
class TextEncoder(nn.Module):
    """transformers text model -> `ModalityTokens` with token strings and character spans.

    `self_attention` (when asked) is the model's per-layer `(B, heads, N, N)` weights as eager
    attention computes them, for every layer or only the layers asked for; capture in eval mode
    (eager weights are post-dropout).

    With `phrase_pooling`, every token of a phrase comes out as the phrase's mean (`phrase_groups`),
    so one attention distribution per phrase has to find the thing with all its attributes.
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer, spec: str, max_length: int | None = None,
                 phrase_pooling: bool = False):
        super().__init__()
        self.phrase_pooling = bool(phrase_pooling)
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"text encoder '{spec}' has a slow tokenizer; character spans need a fast "
                             "(tokenizers-backed) one: save the tokenizer with tokenizer.json")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        limit = getattr(model.config, "max_position_embeddings", None) or 512
        self.max_length = int(min(max_length or tokenizer.model_max_length, limit))
        self.tokenizer.model_max_length = self.max_length
        self.dim = int(model.config.hidden_size)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_directory(cls, path: str | os.PathLike, max_length: int | None = None, **kwargs) -> "TextEncoder":
        model = AutoModel.from_pretrained(str(path), **kwargs)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), str(path), max_length).eval()

    from_hub = from_directory  # the same loaders take a hub name

    @classmethod
    def from_config(cls, d: dict, tokenizer_dir: str | os.PathLike | None = None) -> "TextEncoder":
        model = AutoModel.from_config(config_from_json(d["model_config"]))
        spec = d["spec"]
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        elif spec in BUILTIN_TOKENIZERS:
            tokenizer = BUILTIN_TOKENIZERS[spec](d["max_length"])
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec)
            except Exception as e:
                raise InputError(f"the text encoder '{spec}' needs its tokenizer files: pass tokenizer_dir= "
                                 f"(written by save_tokenizer) ({e})") from None
        return cls(model, tokenizer, spec, d["max_length"], d.get("phrase_pooling", False)).eval()

    def config_dict(self) -> dict:
        """JSON-safe architecture (no weights); tokenizer files go through `save_tokenizer`."""
        return {"modality": "text", "spec": self.spec, "library": "transformers",
                "model_config": json_config(self.model.config), "max_length": self.max_length,
                "phrase_pooling": self.phrase_pooling,
                "tokenizer": {"class": type(self.tokenizer).__name__, "files": "save_tokenizer(dir)"}}

    def save_tokenizer(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        return directory

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """transformers format: model (config.json + model.safetensors) and tokenizer files."""
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        return self.save_tokenizer(directory)

    # -- running ------------------------------------------------------------------------

    def preprocess(self, texts: Sequence[str]) -> dict[str, Any]:
        """Strings -> token ids, masks and geometry (CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [check_text(t) for t in texts]
        if not texts:
            raise InputError("no texts given; pass a list with at least one string")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        mask = enc["attention_mask"].bool()  # (B, N)
        special = enc["special_tokens_mask"].bool() & mask  # (B, N) CLS / SEP
        content = mask & ~special
        unk = self.tokenizer.unk_token_id
        tokens, spans = [], []
        for i, text in enumerate(texts):
            ids = enc["input_ids"][i]
            if unk is not None and bool((ids[content[i]] == unk).all()):
                raise InputError(f"text has no recognisable words for this tokenizer (every token is unknown, "
                                 f"e.g. emoji or symbols only): {text[:60]!r}; write it with letters and digits")
            strings = self.tokenizer.convert_ids_to_tokens(ids.tolist())
            tokens.append([s if m else "" for s, m in zip(strings, mask[i].tolist())])
            spans.append([(int(a), int(b)) if m else (0, 0)
                          for (a, b), m in zip(enc["offset_mapping"][i].tolist(), mask[i].tolist())])
        batch = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        batch["special"] = special
        batch["geometry"] = TextGeometry(texts=texts, tokens=tokens, spans=spans)
        return batch

    def forward(self, batch: dict[str, Any], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        """`capture_attention`: True for every layer's self-attention (eager `output_attentions`), or a list
        of layers for only those (`self_attention[i]` is the i-th of them in layer order; the rest stay SDPA)."""
        device = next(self.model.parameters()).device
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        out, attention = forward_with_attention(self.model, inputs, capture_attention)  # per layer (B, heads, N, N)
        if attention is not None and not attention:
            raise RuntimeError(f"{type(self.model).__name__} returned no attention weights")
        hidden = out.last_hidden_state  # (B, N, D)
        if self.phrase_pooling:
            hidden = pool_phrases(hidden, batch_phrase_groups(batch).to(device))
        return ModalityTokens(tokens=hidden,  # (B, N, D)
                              mask=inputs["attention_mask"].bool(), modality="text",
                              special=batch["special"].to(device), geometry=batch["geometry"],
                              self_attention=attention)

    def encode(self, texts: Sequence[str], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        return self.forward(self.preprocess(texts), capture_attention)


@register_builtin("text", "bert-tiny-scenes")
def bert_tiny_scenes(max_length: int = 64, **config_overrides) -> TextEncoder:
    """2-layer, 128-wide BERT over the scenes vocabulary, trained from scratch (built with random weights)."""
    tokenizer = scenes_tokenizer(max_length)
    config = BertConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": max(64, max_length), "pad_token_id": 0,
        **config_overrides})
    return TextEncoder(BertModel(config), tokenizer, "bert-tiny-scenes", max_length).eval()

