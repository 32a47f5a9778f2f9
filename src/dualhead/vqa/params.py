"""The parameter distribution of a DualHeadVQA model, per component, as in the reference design."""

from __future__ import annotations

from dualhead.vqa.model import DualHeadVQA

SHARED = ("vision", "text", "fusion", "experts", "stitch")
TASK_SPECIFIC = ("encoder_adapters", "task_fusions", "router", "binary_head", "open_head")
LABELS = {
    "vision": "Vision encoder",
    "text": "Text encoder",
    "fusion": "Fusion",
    "experts": "Experts and their gate",
    "stitch": "Cross-stitch unit between the towers",
    "encoder_adapters": "Encoder adapters / LoRA per head",
    "task_fusions": "Fusion per head (task towers)",
    "router": "Question-type router",
    "binary_head": "Binary head",
    "open_head": "Open-ended head",
}


def parameter_rows(model: DualHeadVQA) -> list[dict]:
    """One row per component: parameters, share of the total, trainable or frozen."""
    counts = {}
    for name in SHARED + TASK_SPECIFIC:
        module = getattr(model, name)
        if module is None:
            continue
        params = list(module.parameters())
        counts[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    total = sum(n for n, _ in counts.values())
    return [
        {"component": name, "label": LABELS[name], "parameters": n, "share": n / total, "trainable": trainable == n, "frozen": trainable == 0}
        for name, (n, trainable) in counts.items()
    ]


def format_parameter_table(model: DualHeadVQA) -> str:
    """A markdown table like the reference's, with shared vs task-specific totals."""
    rows = parameter_rows(model)
    total = sum(r["parameters"] for r in rows)
    cfg = model.config
    lines = [
        f"Vision: {cfg.vision.name} ({model.vision.out_dim}-d), text: {cfg.text.name} ({model.text.out_dim}-d), "
        f"fusion: {cfg.fusion} (d={cfg.hidden_dim}"
        + (f", towers: {cfg.towers}" if cfg.towers != "shared" else "")
        + (f", encoder {cfg.encoder_adapters.kind} per head" if cfg.encoder_adapters.enabled else "")
        + f"), open answers: {len(model.vocab.open_answers)}",
        "",
        "| Component | Parameters | Share | Trainable |",
        "| --- | ---: | ---: | --- |",
    ]
    for row in rows:
        state = "yes" if row["trainable"] else ("frozen" if row["frozen"] else "partly")
        lines.append(f"| {row['label']} | {row['parameters']:,} | {100 * row['share']:.2f}% | {state} |")
    lines.append(f"| **Total** | {total:,} | 100.00% | |")
    own = [name for name, present in (("encoder adapters", model.encoder_adapters), ("towers", model.task_fusions)) if present]
    specific = f"Task-specific ({', '.join([*own, 'heads, router'])})" if own else "Task-specific (heads + router)"
    for title, names in (("Shared backbone", SHARED), (specific, TASK_SPECIFIC)):
        n = sum(r["parameters"] for r in rows if r["component"] in names)
        lines.append(f"| {title} | {n:,} | {100 * n / total:.2f}% | |")
    return "\n".join(lines)
