"""The Dual-Head VQA model: shared encoders and fusion, a yes/no head, an open-ended head, a router.

Inputs are grouped: each distinct image (and each distinct question) of a batch is encoded once,
and `image_index` / `question_index` say which row belongs to which question. Precomputed encoder
features (frozen-encoder training) can be passed instead of pixels or tokens. With
``model.experts`` on, expert MLPs mixed by a question-only gate sit between the fusion and the heads
(`dualhead.vqa.experts`). With ``model.towers`` separate or cross_stitch, each head reads a fusion
of its own (a task tower over the shared encoders), mixed by a cross-stitch unit in cross_stitch. With
``model.encoder_adapters`` each head reads the encoders run with its own adapters or LoRA updates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dualhead.backbones.freeze import freeze_module
from dualhead.backbones.text import build_text_encoder, text_encoder_from_files, token_mask
from dualhead.backbones.vision import build_vision_encoder
from dualhead.core.config import config_from_dict, config_to_dict
from dualhead.core.model import MultiTaskModel
from dualhead.mtl.architectures.cross_stitch import CrossStitchUnit
from dualhead.vqa.config import ModelConfig
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.images import ImagePreprocessor, load_rgb
from dualhead.vqa.data.records import BINARY, OPEN, YES_NO
from dualhead.vqa.encoder_adapters import EncoderAdapters
from dualhead.vqa.experts import QuestionExperts
from dualhead.vqa.fusion import build_fusion
from dualhead.vqa.heads import binary_head, open_head, router_head
from dualhead.vqa.metrics import HeadProbabilities, route_to_binary

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_DIR = "text_encoder"  # the text encoder's architecture and tokenizer
ANSWERS_FILE = "answers.json"
QUESTION_TYPES_FILE = "question_types.json"  # the type classifier's classes (route: question_type)
SINGLE = "single"  # the head name of a single-head model's answers
SINGLE_TASK = "answer"  # its task name


@dataclass
class DualHeadOutput:
    """What one forward pass returns (one row per question).

    In single-head mode `open_logits` scores the union of all answers (``vocab.single_head_answers``)
    and `binary_logits` is None.
    """

    binary_logits: Tensor | None
    open_logits: Tensor
    router_logits: Tensor | None
    # attention fusion: [B, 2, 2] weights between the image and question tokens; cross_attention:
    # [B, R] the question's attention over the image regions (`VisionEncoder.region_grid`)
    attention: Tensor | None
    # [B, d] the last shared representation (after the experts, when there are any); with task towers
    # or encoder adapters [B, 2d]: the binary and the open path's fused vectors side by side (each
    # head reads its half)
    fused: Tensor
    # [B, K] the experts' gate logits (route question_type: the type classifier's); None without experts
    gate_logits: Tensor | None = None

    @property
    def predictions(self) -> dict[str, Tensor]:
        """Logits per task (the core's `MultiTaskOutput` view)."""
        if self.binary_logits is None:
            return {SINGLE_TASK: self.open_logits}
        return {BINARY: self.binary_logits, OPEN: self.open_logits}

    @property
    def shared(self) -> dict[str, Tensor]:
        return {"fused": self.fused}


@dataclass
class Answer:
    """The model's answer to one question."""

    answer: str
    head: str  # "binary", "open" or "single"
    probability: float
    top: list[tuple[str, float]]
    expert: int | None = None  # the expert with the largest gate value (models with experts)
    question_type: str | None = None  # that expert's question type (route: question_type)


class DualHeadVQA(MultiTaskModel):
    """Shared vision + text encoders and fusion; a yes/no head and an open-ended head."""

    # Each question is labelled for one head, so the rows of the fused features each carry one
    # task's gradient: conflict lives in the shared parameters, not in the representation.
    representation_shared_by_tasks = False
    representation_key = "fused"

    def __init__(
        self, config: ModelConfig, vocab: AnswerVocab, text_files: Path | None = None, question_types: Sequence[str] = ()
    ):
        """`text_files`: a checkpoint's saved text architecture and tokenizer (see `save_pretrained`),
        used instead of `config.text`'s source, which may not exist on this machine. `question_types`:
        the training split's question types, one expert each (``model.experts.route=question_type``)."""
        super().__init__()
        config.experts.validate()
        config.validate_per_head_parts()
        self.config = config
        self.vocab = vocab
        self.question_types: list[str] = list(question_types)
        self.vision = build_vision_encoder(config.vision)
        self.text = text_encoder_from_files(text_files, config.text) if text_files else build_text_encoder(config.text)
        if config.vision.freeze:
            freeze_module(self.vision)
        if config.text.freeze:
            freeze_module(self.text)
        def fusion() -> nn.Module:
            return build_fusion(
                config.fusion, self.vision.out_dim, self.text.out_dim, config.hidden_dim, config.num_heads,
                config.fusion_dropout, num_regions=self.vision.region_grid[0] * self.vision.region_grid[1],
                layers=config.fusion_layers,
            )

        d = config.hidden_dim
        # One fusion both heads read, or (task towers) one per head and, for cross_stitch, their mixing.
        self.fusion = fusion() if config.towers == "shared" else None
        self.task_fusions = nn.ModuleDict({BINARY: fusion(), OPEN: fusion()}) if self.fusion is None else None
        self.stitch = CrossStitchUnit(2, d, config.stitch_self_weight) if config.towers == "cross_stitch" else None
        self.encoder_adapters = (
            EncoderAdapters(config.encoder_adapters, self.vision, self.text, (BINARY, OPEN))
            if config.encoder_adapters.enabled else None
        )
        # Whether the fusion reads region tokens and word states rather than one vector each.
        self.reads_tokens: bool = (self.fusion or self.task_fusions[BINARY]).reads_tokens
        if config.single_head:
            self.binary_head = None
            self.open_head = open_head(d, len(vocab.single_head_answers), config.dropout, config.deep_heads)
        else:
            self.binary_head = binary_head(d, config.dropout, config.deep_heads)
            self.open_head = open_head(d, max(len(vocab.open_answers), 1), config.dropout, config.deep_heads)
        self.router = router_head(self.text.out_dim, config.dropout) if config.router else None
        self.experts = (
            QuestionExperts(d, self.text.out_dim, self._expert_count(), config.experts) if config.experts.enabled else None
        )
        data_config = self.vision.data_config
        self.preprocessor = ImagePreprocessor(
            data_config["input_size"][-1], tuple(data_config["mean"]), tuple(data_config["std"]), data_config.get("interpolation", "bicubic")
        )

    def _expert_count(self) -> int:
        experts = self.config.experts
        if experts.route != "question_type":
            return experts.count
        if not self.question_types:
            raise ValueError(
                "model.experts.route=question_type needs the training split's question types (question_types); "
                "none were given"
            )
        if experts.count not in (0, len(self.question_types)):
            raise ValueError(
                f"model.experts.count={experts.count} but the training split has {len(self.question_types)} question "
                f"types ({', '.join(self.question_types)}): route question_type has one expert per type (count 0)"
            )
        return len(self.question_types)

    def shared_modules(self) -> list[nn.Module]:
        # the experts and their gate read every question, yes/no or open: both tasks' losses flow through
        # them; with task towers the cross-stitch unit is what both reach (separate towers: nothing above
        # the encoders)
        above = [module for module in (self.fusion, self.experts, self.stitch) if module is not None]
        return [self.vision, self.text, *above]

    def task_modules(self, task: str) -> list[nn.Module]:
        """`task`'s own modules: its head, its fusion tower and its encoder adapters, where they exist."""
        own = [self.binary_head if task == BINARY else self.open_head]
        if self.task_fusions is not None:
            own.append(self.task_fusions[task])
        if self.encoder_adapters is not None:
            own.extend(self.encoder_adapters.task_modules(task))
        return own

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.vision, self.text]

    # -- encoding ---------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """What the fusion reads of each image: one pooled vector [n_images, Dv], or its region
        tokens [n_images, R, Dv] for a token fusion."""
        return self.vision.regions(pixel_values) if self.reads_tokens else self.vision(pixel_values)

    def encode_questions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """What the fusion reads of each question: one pooled vector [n_questions, Dt], or its word
        states [n_questions, max_length, Dt] (zero at padding) for a token fusion."""
        if self.reads_tokens:
            return self.text.token_states(input_ids, attention_mask)
        return self.text(input_ids, attention_mask)

    def pooled_question(self, text_features: Tensor) -> Tensor:
        """One vector per question from `encode_questions`' output (what the router reads)."""
        return self.text.pool(text_features, token_mask(text_features)) if self.reads_tokens else text_features

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
        question_index: Tensor | None = None,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
    ) -> DualHeadOutput:
        if image_features is None and pixel_values is None:
            raise ValueError("forward needs pixel_values or image_features")
        if text_features is None and (input_ids is None or attention_mask is None):
            raise ValueError("forward needs input_ids and attention_mask, or text_features")

        def adapted(task: str | None):  # the encoders with `task`'s adapters switched in (None: plain)
            return self.encoder_adapters.use(task) if task is not None else nullcontext()

        def images(task: str | None) -> Tensor:
            """Each row's image features, encoded with `task`'s adapters."""
            with adapted(task):
                features = self.encode_images(pixel_values) if image_features is None else image_features
            return features[image_index] if image_index is not None else features

        def questions(task: str | None) -> Tensor:
            """Each row's question features, encoded with `task`'s adapters."""
            with adapted(task):
                features = self.encode_questions(input_ids, attention_mask) if text_features is None else text_features
            return features[question_index] if question_index is not None else features

        # Per-head encoder passes where adapters act on what is encoded now (cached features are the
        # plain encoders', exact while the adapters are still the identity). The router and the
        # experts' gate read the plain question.
        per_head = self.encoder_adapters is not None and (image_features is None or text_features is None)
        inputs = {task: (images(task), questions(task)) for task in (BINARY, OPEN)} if per_head else None
        plain = None if per_head else (images(None), questions(None))
        needs_question = self.router is not None or self.experts is not None
        question = self.pooled_question(plain[1] if plain else questions(None)) if needs_question else None
        gate_logits = None
        if self.fusion is None:
            binary_input, open_input, attention = self._towers(inputs or {BINARY: plain, OPEN: plain})
            fused = torch.cat([binary_input, open_input], dim=-1)
        elif per_head:
            (binary_input, binary_attention), (open_input, open_attention) = (
                self.fusion(*inputs[task]) for task in (BINARY, OPEN)
            )
            fused = torch.cat([binary_input, open_input], dim=-1)
            attention = mean_attention([binary_attention, open_attention])
        else:
            fused, attention = self.fusion(*plain)
            if self.experts is not None:
                fused, gate_logits = self.experts(fused, question)
            binary_input = open_input = fused
        return DualHeadOutput(
            binary_logits=self.binary_head(binary_input) if self.binary_head is not None else None,
            open_logits=self.open_head(open_input),
            router_logits=self.router(question) if self.router is not None else None,
            attention=attention,
            fused=fused,
            gate_logits=gate_logits,
        )

    def _towers(self, inputs: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The binary and the open tower's fused vectors of their (image, question) `inputs`
        (cross-stitched when `stitch` is set) and the towers' attention, averaged."""
        outputs = [self.task_fusions[task](*inputs[task]) for task in (BINARY, OPEN)]
        towers = [fused for fused, _ in outputs]
        if self.stitch is not None:
            towers = self.stitch(towers)
        return towers[0], towers[1], mean_attention([attention for _, attention in outputs])

    # -- inference --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def answer(self, images: list[str | Path | Image.Image], questions: list[str], top_k: int = 5) -> list[Answer]:
        """Answer each question about its image; the router decides which head answers."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        was_training = self.training
        self.eval()
        try:
            pixels = torch.stack(
                [self.preprocessor.to_uint8(img if isinstance(img, Image.Image) else load_rgb(Path(img))) for img in images]
            )
            tokens = self.text.tokenize(list(questions))
            output = self(
                pixel_values=self.preprocessor.normalize(pixels).to(self.device),
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            probs = HeadProbabilities.from_output(output)
            answers = decode_answers(probs, self.vocab, route_to_binary(probs, self.vocab), top_k)
            if probs.experts is not None:
                for answer, expert in zip(answers, probs.experts.argmax(-1).tolist(), strict=True):
                    answer.expert = expert
                    answer.question_type = self.question_types[expert] if self.question_types else None
            return answers
        finally:
            self.train(was_training)

    # -- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Config JSON, safetensors weights, the answer vocabulary and the text encoder's architecture
        and tokenizer (so a model whose encoder came from a local directory loads anywhere); no pickle."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"model": config_to_dict(self.config)}, indent=2))
        (directory / ANSWERS_FILE).write_text(json.dumps(self.vocab.to_json(), indent=2))
        if self.question_types:
            (directory / QUESTION_TYPES_FILE).write_text(json.dumps({"question_types": self.question_types}, indent=2))
        self.text.save_files(directory / TEXT_DIR)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> DualHeadVQA:
        """Rebuild a saved model offline (encoder weights come from the file, not their sources)."""
        directory = Path(directory)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, ANSWERS_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved DualHeadVQA model: missing {', '.join(missing)}")
        config = config_from_dict(ModelConfig, json.loads((directory / CONFIG_FILE).read_text())["model"])
        # The saved state holds the encoder weights: build the vision architecture without its source.
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, weights="none"))
        vocab = AnswerVocab.from_json(json.loads((directory / ANSWERS_FILE).read_text()))
        text_files = directory / TEXT_DIR
        model = cls(config, vocab, text_files if text_files.is_dir() else None, read_question_types(directory))
        model.load_weights(directory, map_location)
        return model.to(map_location)

    def load_weights(self, directory: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load the weights of a saved model of the same configuration into this one."""
        self.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE), device=str(map_location)))


def mean_attention(maps: list[Tensor | None]) -> Tensor | None:
    """The mean of per-head attention maps (each sums to one over what it attends to, so the mean
    does); None for fusions without attention."""
    present = [attention for attention in maps if attention is not None]
    return torch.stack(present).mean(0) if present else None


def read_question_types(directory: Path) -> list[str]:
    """The question types saved with a model (none when it has no such file)."""
    path = directory / QUESTION_TYPES_FILE
    if not path.is_file():
        return []
    try:
        types = json.loads(path.read_text(encoding="utf-8"))["question_types"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the saved question types {path}: {err}") from None
    if not isinstance(types, list) or not all(isinstance(name, str) for name in types):
        raise ValueError(f"{path}: 'question_types' must be a list of strings")
    return types


def decode_answers(probs: HeadProbabilities, vocab: AnswerVocab, to_binary: Tensor, top_k: int = 5) -> list[Answer]:
    """Turn probabilities into answer strings, each question answered by the head it is routed to."""
    single = probs.binary is None
    open_names = vocab.single_head_answers if single else vocab.open_answers
    answers = []
    for row, binary in enumerate(to_binary.tolist()):
        if binary:
            row_probs, names, head = probs.binary[row], YES_NO, BINARY
        else:
            row_probs, names, head = probs.open[row], open_names, SINGLE if single else OPEN
        values, indices = row_probs.topk(min(top_k, len(names)))
        top = [(names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
        answers.append(Answer(answer=top[0][0], head=head, probability=top[0][1], top=top))
    return answers
