"""What an answer looked at: a map over the image's regions, drawn over the image.

With the ``cross_attention`` fusion the map is the question's attention over the regions (the
fusion's pooling weights, what the answer was computed from). Fusions that see one pooled vector
per image have no such attention; for them the map is Grad-CAM (Selvaraju et al., ICCV 2017) on the
vision encoder's last feature map: the gradient of the answer's logit, averaged per channel, weighs
the channels, and negative evidence is clipped. Either way the map sums to one over the regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dualhead.vqa.data.images import load_rgb
from dualhead.vqa.data.records import BINARY, YES_NO
from dualhead.vqa.model import SINGLE, Answer, DualHeadVQA

ATTENTION, GRAD_CAM = "attention", "grad-cam"


@dataclass
class Explanation:
    """An answer and the map of what it looked at: ``weights`` [rows, columns] sums to one."""

    question: str
    answer: Answer
    weights: Tensor
    method: str  # ATTENTION or GRAD_CAM


def explain(model: DualHeadVQA, image: str | Path | Image.Image, question: str, top_k: int = 5) -> Explanation:
    """Answer `question` about `image` and say where in the image the answer came from."""
    picture = image if isinstance(image, Image.Image) else load_rgb(Path(image))
    answer = model.answer([picture], [question], top_k=top_k)[0]
    pixels = model.preprocessor.normalize(model.preprocessor.to_uint8(picture).unsqueeze(0)).to(model.device)
    tokens = {k: v.to(model.device) for k, v in model.text.tokenize([question]).items()}
    was_training = model.training
    model.eval()
    try:
        if model.reads_tokens:
            with torch.no_grad():
                weights, method = model(pixel_values=pixels, **tokens).attention[0], ATTENTION
        else:
            weights, method = _grad_cam(model, pixels, tokens, answer), GRAD_CAM
    finally:
        model.train(was_training)
    return Explanation(question, answer, weights.float().reshape(model.vision.region_grid).cpu(), method)


def _grad_cam(model: DualHeadVQA, pixels: Tensor, tokens: dict[str, Tensor], answer: Answer) -> Tensor:
    """Grad-CAM weights [R] of `answer`'s logit over the vision encoder's last feature map."""
    with torch.no_grad():
        features = model.vision.features(pixels)
        text = model.encode_questions(tokens["input_ids"], tokens["attention_mask"])
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(image_features=model.vision.pool(features), text_features=text)
        if answer.head == BINARY:
            logit = output.binary_logits[0, YES_NO.index(answer.answer)]
        else:
            names = model.vocab.single_head_answers if answer.head == SINGLE else model.vocab.open_answers
            logit = output.open_logits[0, names.index(answer.answer)]
        (gradient,) = torch.autograd.grad(logit, features)
    regions, gradients = model.vision.as_regions(features)[0], model.vision.as_regions(gradient)[0]
    cam = (regions * gradients.mean(dim=0)).sum(dim=-1).clamp(min=0).detach()
    total = cam.sum()
    return cam / total if total > 0 else torch.full_like(cam, 1 / cam.numel())


def save_explanation(explanation: Explanation, image: str | Path | Image.Image, path: str | Path) -> Path:
    """The image with the map over it (bilinear, semi-transparent), the question and answer as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image if isinstance(image, Image.Image) else load_rgb(Path(image))
    width, height = picture.size
    answer = explanation.answer
    figure, axes = plt.subplots(figsize=(5, 5.6))
    axes.imshow(picture)
    overlay = axes.imshow(explanation.weights.numpy(), cmap="inferno", alpha=0.5, interpolation="bilinear",
                          extent=(0, width, height, 0))
    figure.colorbar(overlay, ax=axes, fraction=0.046, pad=0.04, label=f"{explanation.method} weight")
    head = {"binary": "yes/no head", "open": "open-ended head", SINGLE: "single head"}[answer.head]
    axes.set_title(f"Q: {explanation.question}\nA: {answer.answer} ({head}, p = {answer.probability:.2f})", fontsize=10)
    axes.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
