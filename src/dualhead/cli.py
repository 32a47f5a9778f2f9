"""The `dualhead` command line: train, pretrain, distill, evaluate, predict, explain, params, ablate,
compare, recommend, export, serve, data summary, plot."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import sys
from pathlib import Path

import click
from safetensors import SafetensorError

from dualhead.core.config import DEFAULT_CONFIG, RunConfig, load_config
from dualhead.vqa.config import PretrainConfig, VQARunConfig

PREDICT_CHUNK = 64  # questions answered per forward pass by `predict --input`


def _split_config_args(args: tuple[str, ...]) -> tuple[str, list[str]]:
    """`[config.yaml] [key=value ...]` -> (config path or bundled name, overrides)."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return DEFAULT_CONFIG, list(args)


def _load(args: tuple[str, ...], extra: list[str] = ()) -> RunConfig:
    path, overrides = _split_config_args(args)
    return load_config(path, [*overrides, *extra])


def _fail(message: str) -> None:
    raise click.ClickException(message)


def describe(error: BaseException) -> str:
    """One line for a user error: what went wrong and, for OS errors, with which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error).strip() or type(error).__name__
    if isinstance(error, RuntimeError) and "state_dict" in text:  # torch's mismatched-weights report
        text = "the weights do not fit the model: " + text.splitlines()[0]
    return text


def is_user_error(error: BaseException) -> bool:
    """Errors a user causes: bad options, configs, data, files or weights, a diverged run, a full disk.
    Programming errors (a graph backpropagated twice, a missing method, a bad lookup) are not."""
    from dualhead.core.trainer import TrainingDiverged

    if isinstance(error, NotImplementedError):
        return False
    if isinstance(error, ValueError | OSError | ImportError | pickle.UnpicklingError | SafetensorError | TrainingDiverged):
        return True
    # torch reports mismatched weights and unreadable checkpoint files as RuntimeErrors
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in ("state_dict", "PytorchStreamReader"))


class UserErrorsAsMessages(click.Group):
    """User errors end the command with one line instead of a traceback; ``--debug`` shows it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as error:
            if (ctx.obj or {}).get("debug") or not is_user_error(error):
                raise
            raise click.ClickException(f"{describe(error)} (dualhead --debug ... shows the traceback)") from error


@click.group(cls=UserErrorsAsMessages)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """dualhead: multi-task learning, and the Dual-Head VQA model."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue a stopped run from its last checkpoint.")
def train(args: tuple[str, ...], resume_dir: str | None) -> None:
    """Train a model: `dualhead train [config.yaml | bundled name] [key=value ...]` (default: easy_vqa).

    Several processes: `torchrun --nproc-per-node N -m dualhead train ...` (rank 0 writes the run)."""
    from dualhead.core import distributed

    try:
        _train(args, resume_dir)
    finally:
        distributed.shutdown()


def _train(args: tuple[str, ...], resume_dir: str | None) -> None:
    from dualhead.core import distributed
    from dualhead.core.trainer import Trainer, new_run_dir

    if resume_dir:
        if args:
            _fail("--resume continues a run with its own config.yaml; give no config or overrides with it")
        trainer = Trainer.resume(Path(resume_dir))
    else:
        config = _load(args)
        distributed.setup(config.train.device)  # under torchrun: the processes agree on the run directory
        run_dir = new_run_dir(config)
        if distributed.broadcast_object(run_dir.exists() and any(run_dir.iterdir())):
            _fail(f"run directory {run_dir} already exists: continue it with --resume {run_dir}, or set name=...")
        trainer = Trainer(config, run_dir)
    results = trainer.fit()
    if distributed.is_main():
        click.echo((trainer.run_dir / "results.md").read_text())
        click.echo(f"run directory: {trainer.run_dir} (best checkpoint: {results['checkpoint']})")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write the pretrained encoders.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=PretrainConfig.batch_size, show_default=True, type=click.IntRange(min=2),
              help="Distinct images per batch.")
@click.option("--encoder-lr", default=PretrainConfig.encoder_lr, show_default=True, type=float)
@click.option("--temperature", default=PretrainConfig.temperature, show_default=True, type=float,
              help="Initial temperature (learned).")
@click.option("--answers/--no-answers", default=PretrainConfig.with_answers, show_default=True,
              help='Pair images with "question answer" text.')
def pretrain(args: tuple[str, ...], out: str, epochs: int, batch_size: int, encoder_lr: float, temperature: float,
             answers: bool) -> None:
    """Align a VQA config's image and text encoders on its training split (contrastive, CLIP-style),
    then print the overrides that train the dual-head model from them:
    `dualhead pretrain vqa_rad --out runs/pretrain-vqa_rad`. (A config's ``pretrain.epochs`` makes
    this the first step of `dualhead train` instead.)"""
    from dualhead.vqa.pretrain import pretrain as run_pretraining

    config = _load(args)
    if not isinstance(config, VQARunConfig):
        _fail(f"pretrain aligns a VQA model's encoders; this config's application is {config.application!r}")
    options = dataclasses.replace(config.pretrain, epochs=epochs, batch_size=batch_size, encoder_lr=encoder_lr,
                                  temperature=temperature, with_answers=answers)
    summary = run_pretraining(config, Path(out), options, progress=config.train.progress)
    best = summary["best"]
    click.echo(f"validation image->text recall@1: {summary['val_recall_at_1_before']:.3f} before, "
               f"{best['val_recall_at_1']:.3f} after epoch {best['epoch']}")
    click.echo("train from them with: dualhead train " + " ".join([*args, *summary["overrides"]]))


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]), show_default=True)
@click.option("--checkpoints", "ensemble", multiple=True, type=click.Path(exists=True), help="More checkpoints: evaluate the ensemble.")
@click.option("--format", "data_format", help="Dataset format, for a checkpoint outside a run directory.")
@click.option("--root", type=click.Path(exists=True, file_okay=False), help="Where the dataset files are.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON here.")
@click.option("--tta", default=0, show_default=True, type=click.IntRange(min=0),
              help="Test-time augmentation: also average over this many augmented views of each image.")
def evaluate(run: str, split: str, ensemble: tuple[str, ...], data_format: str | None, root: str | None, device: str,
             json_path: str | None, tta: int) -> None:
    """Accuracy of a run or checkpoint (or an ensemble) on a split: overall, per head, per answer type, routing."""
    from dualhead.core.io import atomic_write_json
    from dualhead.vqa.config import DataConfig
    from dualhead.vqa.evaluate import evaluate_checkpoints
    from dualhead.vqa.metrics import format_metrics_table

    data = DataConfig(format=data_format, root=root) if data_format else None
    result = evaluate_checkpoints([run, *ensemble], split=split, data=data, device=device, tta=tta)
    metrics = {k: v for k, v in result["metrics"].items() if k != "binary_confusion"}
    title = f"{result['dataset']} {split}" + (f", ensemble of {len(result['checkpoints'])}" if len(result["checkpoints"]) > 1 else "")
    title += f", {tta} augmented views" if tta else ""
    click.echo(format_metrics_table(metrics, title))
    if json_path:
        atomic_write_json(Path(json_path), result)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="The image to ask about.")
@click.option("--question", help="The question.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="JSONL of {image, question} to answer.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Answers listed per question.")
@click.option("--explain", "explain_png", type=click.Path(dir_okay=False),
              help="With --image/--question: also write what the answer looked at to this PNG (see `explain`).")
def predict(checkpoint: str, image: str | None, question: str | None, input_path: str | None, top_k: int,
            explain_png: str | None) -> None:
    """Answer questions with a trained model: one (--image, --question) or many (--input file.jsonl).

    With --input, a bad line (not JSON, a missing field, an image that cannot be read) is reported
    with its line number on stderr and the other lines are still answered; the exit code is 1 then.
    """
    from dualhead.vqa.evaluate import resolve_checkpoint
    from dualhead.vqa.model import DualHeadVQA

    if input_path and (image or question):
        _fail("use either --input or --image with --question, not both")
    if not input_path and not (image and question):
        _fail("give --image and --question, or --input file.jsonl")
    if explain_png and input_path:
        _fail("--explain answers one --image/--question, not an --input file")
    model = DualHeadVQA.from_pretrained(resolve_checkpoint(checkpoint))
    if not input_path:
        if explain_png:
            _explain(model, image, question, explain_png, top_k)
            return
        _echo_answer(model.answer([image], [question], top_k=top_k)[0])
        return
    queries, failures = _read_queries(Path(input_path))
    for start in range(0, len(queries), PREDICT_CHUNK):
        chunk = queries[start : start + PREDICT_CHUNK]
        try:
            answers = model.answer([q["image"] for q in chunk], [q["question"] for q in chunk], top_k=top_k)
        except (ValueError, OSError):  # one bad image: answer the chunk's lines one by one to name it
            answers = []
            for query in chunk:
                try:
                    answers += model.answer([query["image"]], [query["question"]], top_k=top_k)
                except (ValueError, OSError) as error:
                    failures.append(f"{input_path} line {query['line']}: {describe(error)}")
                    answers.append(None)
        for query, answer in zip(chunk, answers, strict=True):
            if answer is not None:
                experts = ({"expert": answer.expert, "question_type": answer.question_type}
                           if answer.expert is not None else {})
                click.echo(json.dumps({**query, "answer": answer.answer, "head": answer.head, **experts,
                                       "probability": answer.probability, "top": answer.top}))
    for failure in failures:
        click.echo(failure, err=True)
    if failures:
        click.echo(f"{len(failures)} line(s) of {input_path} failed", err=True)
        sys.exit(1)


def _echo_answer(answer) -> None:
    routed = f", expert {answer.expert}" if answer.expert is not None else ""
    routed += f" ({answer.question_type})" if answer.question_type is not None else ""
    click.echo(f"answer: {answer.answer}  (head: {answer.head}{routed}, probability {answer.probability:.3f})")
    for rank, (name, prob) in enumerate(answer.top, 1):
        click.echo(f"  {rank}. {name:<30} {prob:.3f}")


def _explain(model, image: str, question: str, png: str, top_k: int) -> None:
    from dualhead.vqa.explain import explain as explain_answer
    from dualhead.vqa.explain import save_explanation

    explanation = explain_answer(model, image, question, top_k=top_k)
    _echo_answer(explanation.answer)
    click.echo(f"{explanation.method} map over {'x'.join(map(str, explanation.weights.shape))} regions: "
               f"{save_explanation(explanation, image, png)}")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="The image to ask about.")
@click.option("--question", required=True, help="The question.")
@click.option("--out", type=click.Path(dir_okay=False), help="The PNG to write (default: <image name>.explain.png here).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Answers listed.")
def explain(checkpoint: str, image: str, question: str, out: str | None, top_k: int) -> None:
    """Answer a question and draw what the answer looked at over the image: the question's attention
    over the image regions (cross_attention fusion) or a Grad-CAM map (other fusions)."""
    from dualhead.vqa.evaluate import resolve_checkpoint
    from dualhead.vqa.model import DualHeadVQA

    model = DualHeadVQA.from_pretrained(resolve_checkpoint(checkpoint))
    _explain(model, image, question, out or f"{Path(image).stem}.explain.png", top_k)


def _read_queries(path: Path) -> tuple[list[dict], list[str]]:
    """{image, question, line} per valid line (image paths relative to the file's folder), and one
    message per bad line."""
    queries, failures = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):  # JSON may hold U+2028 unescaped
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            failures.append(f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        except json.JSONDecodeError as err:
            failures.append(f"{path} line {number}: not valid JSON ({err.msg})")
            continue
        wrong = [key for key in ("image", "question") if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip()]
        if wrong:
            failures.append(f"{path} line {number}: {', '.join(wrong)} missing or not text")
            continue
        image = Path(row["image"])
        queries.append({"image": str(image if image.is_absolute() else path.parent / image), "question": row["question"], "line": number})
    return queries, failures


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--vision", help="Vision encoder (timm name), e.g. mobilenetv3_small_100.")
@click.option("--text", help="Text encoder: minilm, distilbert, bert-base or a local directory.")
@click.option("--answers", type=int, help="Open-answer vocabulary size (default: from the configured dataset).")
def params(args: tuple[str, ...], vision: str | None, text: str | None, answers: int | None) -> None:
    """Parameter distribution per component (shared vs task-specific), as in the reference design."""
    from dualhead.vqa.data import AnswerVocab, load_splits
    from dualhead.vqa.experiment import training_question_types
    from dualhead.vqa.model import DualHeadVQA
    from dualhead.vqa.params import format_parameter_table

    extra = [f"model.vision.name={vision}"] if vision else []
    extra += [f"model.text.name={text}"] if text else []
    config = _load(args, extra)
    if config.model.vision.name != "efficientnet_lite0" and config.model.vision.weights == "offline":
        config.model.vision.weights = "none"  # counting parameters needs no weights
    # The data is read only where the model's shape depends on it: the answer vocabulary, and one
    # expert per training question type (model.experts.route=question_type).
    needs_data = answers is None or config.model.experts.route == "question_type"
    train = load_splits(config.data).train if needs_data else []
    if answers is not None:
        vocab = AnswerVocab([f"answer {i}" for i in range(answers)])
    else:
        vocab = AnswerVocab.from_records(train, config.data.min_answer_count, config.data.max_answers)
    model = DualHeadVQA(config.model, vocab, question_types=training_question_types(config, train))
    click.echo(format_parameter_table(model))


def _study_command(study: str, help_text: str, default_seeds: int):
    """`dualhead ablate` / `dualhead compare`: the same options, a different list of variants."""

    @main.command(study_commands[study], help=help_text, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    @click.option("--seeds", default=default_seeds, show_default=True, type=click.IntRange(min=1),
                  help="Seeds 0..N-1 for every configuration.")
    @click.option("--out", type=click.Path(file_okay=False), help="Study directory (default: <output_dir>/<study>-<format>).")
    @click.option("--only", multiple=True, help="Run only these configurations (repeatable), by name.")
    def command(args: tuple[str, ...], seeds: int, out: str | None, only: tuple[str, ...]) -> None:
        from dualhead.vqa.studies import format_report, run_study

        config = _load(args)
        out_dir = Path(out) if out else Path(config.output_dir) / f"{study}-{config.data.format}"
        report = run_study(study, config, list(range(seeds)), out_dir, only)
        click.echo(format_report(report))
        click.echo(f"\nwritten: {out_dir / study}.md, .json, .png (runs under {out_dir})")

    return command


study_commands = {"ablation": "ablate", "comparison": "compare"}
ablate = _study_command(
    "ablation",
    "The reference ablation: full model, separate models, no attention fusion, frozen encoders, single head.\n\n"
    "`dualhead ablate [config.yaml | bundled name] [key=value ...] --seeds 3`: the same data, budget and seeds for each; "
    "finished runs are read back, interrupted ones resume.",
    default_seeds=3,
)
compare = _study_command(
    "comparison",
    "The reference comparison and more: default encoders; pretrained larger encoders (EfficientNet-Lite2, MPNet: "
    "the 'large' extra and the MPNet packages); MobileNetV3-Small + DistilBERT, ResNet-50 + BERT-base, ViT + "
    "BERT-base; experts per question type and learned experts; task towers, separate and cross-stitched; adapters "
    "and LoRA per head in the encoders; separate models; single head. Parameters, accuracy, "
    "time per epoch, inference latency.\n\n"
    "Encoders without offline weights here start from random initialisation (the table says which); --only picks rows.",
    default_seeds=1,
)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Training steps of the hard-sharing probe run.")
@click.option("--cost-steps", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed training steps per candidate architecture (after one warm-up step).")
@click.option("--lookahead-lr", type=click.FloatRange(min=0, min_open=True),
              help="SGD rate of the affinity lookahead step (default: train.lr).")
@click.option("--limited-compute", is_flag=True, help="Compute is limited: the decision tree's hard-sharing branch.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
def recommend(args: tuple[str, ...], steps: int, cost_steps: int, lookahead_lr: float | None, limited_compute: bool,
              out: str | None) -> None:
    """Measure how a config's tasks relate on a short hard-sharing probe run (gradient cosine and norm
    ratio at the shared parameters, inter-task affinity) and recommend an architecture by the seed's
    decision tree, with the parameters and step time of each candidate on this config:
    `dualhead recommend scenes --steps 20 --out recommend.json`."""
    from dualhead.core.io import atomic_write_json
    from dualhead.dense.models import DENSE_ARCHITECTURES
    from dualhead.mtl.recommend import architecture_candidates, format_recommendation
    from dualhead.mtl.recommend import recommend as run_recommendation

    config = _load(args)
    probe_config, candidates = architecture_candidates(config, sorted(DENSE_ARCHITECTURES), hard_sharing="hard_fpn")
    result = run_recommendation(probe_config, candidates, steps=steps, cost_steps=cost_steps,
                                lookahead_lr=lookahead_lr, limited_compute=limited_compute)
    click.echo(format_recommendation(result))
    if out:
        atomic_write_json(Path(out), {"config": " ".join(args), **result})
        click.echo(f"\nwritten: {out}")


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "export_format", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--int8", is_flag=True, help="Also write a dynamically int8-quantised copy (model.int8.onnx).")
def export(run: str, out: str, export_format: str, int8: bool) -> None:
    """Export a trained model (a run's best checkpoint, or a checkpoint) for inference without dualhead:
    the whole model and each head as ONNX, with the tokenizer, answers and preprocessing beside them."""
    from dualhead.deploy.export import export_onnx
    from dualhead.vqa.evaluate import resolve_checkpoint
    from dualhead.vqa.model import DualHeadVQA

    for path in export_onnx(DualHeadVQA.from_pretrained(resolve_checkpoint(run)), Path(out), quantize=int8):
        click.echo(str(path))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("teacher", type=click.Path(exists=True))
@click.argument("args", nargs=-1)
@click.option("--teacher", "more_teachers", multiple=True, type=click.Path(exists=True),
              help="Another teacher run or checkpoint (repeatable): the teachers' probabilities are averaged.")
def distill(teacher: str, args: tuple[str, ...], more_teachers: tuple[str, ...]) -> None:
    """Train a smaller student on a trained teacher's answers and the labels:
    `dualhead distill TEACHER_RUN [--teacher RUN ...] [student config] [key=value ...]`.

    Without a student config the student starts from the teacher run's own config. Each head learns
    (1 - distill.alpha) x its loss on the labels + distill.alpha x T^2 x KL to the teacher at
    temperature distill.temperature. The output is a normal run directory (evaluate, export and
    predict work on it); `dualhead train --resume RUN` continues it.
    """
    from dualhead.core.trainer import Trainer, new_run_dir
    from dualhead.deploy.distill import distillation_config

    student, overrides = (args[0], list(args[1:])) if args and "=" not in args[0] else (None, list(args))
    config = distillation_config([teacher, *more_teachers], student, overrides)
    run_dir = new_run_dir(config, label=f"{config.data.format}-student")
    if run_dir.exists() and any(run_dir.iterdir()):
        _fail(f"run directory {run_dir} already exists: continue it with dualhead train --resume {run_dir}, or set name=...")
    trainer = Trainer(config, run_dir)
    results = trainer.fit()
    click.echo((trainer.run_dir / "results.md").read_text())
    click.echo(f"run directory: {trainer.run_dir} (best checkpoint: {results['checkpoint']})")


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most questions answered in one forward pass; 1 turns batching off.")
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the first queued question waits for others to join its batch.")
@click.option("--max-questions", default=16, show_default=True, type=click.IntRange(min=1),
              help="Questions per request.")
@click.option("--max-queued", default=512, show_default=True, type=click.IntRange(min=1),
              help="Questions of all requests waiting for the model; beyond it requests get 503 (retry).")
@click.option("--max-upload-mb", default=16.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest image file accepted, in MiB.")
@click.option("--max-pixels", type=click.IntRange(min=1),
              help="Largest image accepted, in pixels (default: the data loaders' limit, 64 Mpx).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
def serve(run: str, host: str, port: int, max_batch: int, batch_wait_ms: float, max_questions: int,
          max_queued: int, max_upload_mb: float, max_pixels: int | None, device: str, precision: str) -> None:
    """Serve a trained model over HTTP (a run's best checkpoint, or a checkpoint): POST /v1/answer,
    GET /healthz, a web page at /, the API at /docs. Concurrent requests are answered in batches."""
    import uvicorn

    from dualhead.deploy.serve import ServeLimits, create_app

    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_questions=max_questions,
                         max_queued=max_queued,
                         **({"max_pixels": max_pixels} if max_pixels else {}))
    app = create_app(run, max_batch=max_batch, batch_wait_ms=batch_wait_ms, limits=limits, device=device,
                     precision=precision)
    uvicorn.run(app, host=host, port=port, log_level="info")


@main.group()
def data() -> None:
    """Inspect datasets."""


@data.command("summary")
@click.argument("data_format")
@click.option("--root", type=click.Path(exists=True, file_okay=False), help="Where the dataset files are.")
@click.option("--lang", default="en", show_default=True, help="SLAKE question language (en, zh, all).")
@click.option("--check-images", is_flag=True, help="Decode every image and report the ones that fail.")
@click.option("--skip-invalid", is_flag=True, help="Skip malformed records (counted by reason) instead of failing.")
@click.option("--min-answer-count", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", type=click.IntRange(min=1),
              help="Count questions longer than this many tokens of the default question encoder (truncated in training).")
def data_summary(data_format: str, root: str | None, lang: str, check_images: bool, skip_invalid: bool,
                 min_answer_count: int, max_length: int | None) -> None:
    """Counts per split, task and answer type; vocabulary coverage; rejected records."""
    from dualhead.vqa.config import DataConfig
    from dualhead.vqa.data import AnswerVocab, load_splits
    from dualhead.vqa.data.summary import format_summary, summarize

    config = DataConfig(format=data_format, root=root, lang=lang, skip_invalid=skip_invalid, min_answer_count=min_answer_count)
    splits = load_splits(config)
    vocab = AnswerVocab.from_records(splits.train, min_answer_count)
    tokenize = None
    if max_length is not None:
        from transformers import AutoTokenizer

        from dualhead.backbones.text import minilm_path

        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)

        def tokenize(question: str) -> list[int]:  # special tokens included, as the encoder sees them
            return tokenizer(question)["input_ids"]
    click.echo(format_summary(summarize(splits, vocab, check_images=check_images, tokenize=tokenize, max_length=max_length)))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
def plot(run: str) -> None:
    """(Re)draw a run's plots as PNG: loss and accuracy curves, binary confusion matrix."""
    from dualhead.core.applications import get_application
    from dualhead.core.plots import plot_run

    run_dir = Path(run)
    written = plot_run(run_dir)
    results = run_dir / "test_metrics.json"
    if results.is_file() and (run_dir / "config.yaml").is_file():
        plot_results = get_application(load_config(run_dir / "config.yaml").application).plot_results
        if plot_results is not None:
            written += plot_results(run_dir, json.loads(results.read_text()))
    for path in written:
        click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
