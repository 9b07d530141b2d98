"""``steerserve eval ...``: TruthfulQA MC1/MC2/binary and the steering effect on generation, several vectors side
by side with the unsteered model, printed as a Markdown table and optionally saved as JSON and Markdown.

Conditions: each ``--vector`` (repeatable) with its ``--layers`` and ``--scale``; give those once for every
vector or once per vector. ``--scale`` may be a comma list (one condition per scale). Scales are fractions of each
layer's mean hidden-state norm (as in sweeps) unless ``--absolute``. Without ``--scale``, a vector built with a
validation sweep uses the best (layer, scale) that sweep recorded.

Both commands put prompts in the same format by default (:data:`CHAT`: raw text; ``--chat`` for the chat
template), so a TruthfulQA score and a steering-effect measurement on the same prompts see the same tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    DEFAULT_VECTOR_DIR,
    DeviceOpt,
    DirOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RowsOpt,
    ThreadsOpt,
    console,
    fail,
    load,
    local_images,
    open_store,
    parse_layers,
    parse_params,
    parse_positions,
    print_json,
    run_with_progress,
)
from steering.datasets import DEFAULT_QA_TEMPLATE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evaluate steering: TruthfulQA, and the effect on generation (behaviour, fluency).")

VectorOpt = Annotated[list[str], typer.Option("--vector", help="Registered vector to evaluate (repeatable).")]
ScaleOpt = Annotated[list[str], typer.Option("--scale", help="Scale(s), e.g. '1' or '0.5,1,2': once for all "
                                                             "vectors or once per vector.")]
LayersOpt = Annotated[list[str], typer.Option("--layers", help="Layers, e.g. '3' or '2-4': once for all vectors "
                                                               "or once per vector.")]
PositionsOpt = Annotated[str, typer.Option(help="all, prompt, generated, or token positions '3,4'.")]
AbsoluteOpt = Annotated[bool, typer.Option(help="Scales are absolute (default: fractions of each layer's mean "
                                                "hidden-state norm, as in sweeps).")]
OutputOpt = Annotated[Path | None, typer.Option(help="Write the JSON report here.")]
MarkdownOpt = Annotated[Path | None, typer.Option(help="Write the Markdown table here.")]
NormalizeOpt = Annotated[bool, typer.Option(help="Keep each steered token's norm (with --scale; as in sweeps).")]

CHAT = False
"""The prompt format of both eval commands unless --chat/--no-chat says: raw text (the filled template, or the
prompt as written)."""
ChatOpt = Annotated[bool, typer.Option(
    "--chat/--no-chat",
    help="Put each prompt in the model's chat template as a user message (TruthfulQA: the filled template; answers "
         "then follow the generation prompt directly). Both eval commands default to raw text.")]


def _per_vector(values: list[str], n: int, option: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise typer.BadParameter(f"give {option} once, or once per --vector ({n})", param_hint=option)
    return list[str | None](values)


def conditions_from_options(store, vectors: list[str], scales: list[str], layers: list[str], positions: str,
                            normalize: bool, absolute: bool):
    """One condition per (vector, scale); without a scale, the vector's recorded sweep choice."""
    from steering.spec import SteeringApplication, SteeringSpec
    from steering.tasks.evaluation import Condition, condition, label_for, sweep_choice

    pos = parse_positions(positions)
    out = []
    for name, scale_text, layer_text in zip(vectors, _per_vector(scales, len(vectors), "--scale"),
                                            _per_vector(layers, len(vectors), "--layers")):
        vec = store.get(name)
        chosen = parse_layers(layer_text)
        if scale_text is None:
            if chosen is not None:
                raise typer.BadParameter("--layers needs --scale (without both, the vector's sweep choice is used)",
                                         param_hint="--layers")
            app = sweep_choice(vec, param="--scale")
            label = (f"{name} (stored setting)" if app.scale is None else
                     label_for(name, app.layers or vec.layers, app.scale, False) + " (sweep)")
            out.append(Condition(label, SteeringSpec([app])))
            continue
        try:
            values = [float(s) for s in scale_text.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(f"scales must be numbers, got {scale_text!r}", param_hint="--scale") from None
        lay = chosen if chosen is not None else vec.layers
        for s in values:
            spec = SteeringSpec([SteeringApplication(vec, s, lay, pos, normalize)])
            out.append(condition(spec, label=label_for(name, lay, s, not absolute), relative=not absolute,
                                 param="--scale"))
    return out


def _emit(report, output: Path | None, markdown: Path | None, as_json: bool = False) -> None:
    from steering.files import atomic_write_text

    md = report.markdown()
    if as_json:
        print_json(report.as_dict())
    else:
        sys.stdout.write(md)
    if output is not None:
        atomic_write_text(output, json.dumps(report.as_dict(), indent=2))
        console.print(f"wrote {output}")
    if markdown is not None:
        atomic_write_text(markdown, md)
        console.print(f"wrote {markdown}")


@app.command()
def truthfulqa(
    data: Annotated[Path, typer.Option(help="TruthfulQA CSV (Question, Best Answer, Correct Answers, "
                                            "Incorrect Answers), or a .jsonl of preference examples (prompt, "
                                            "preferred, dispreferred, optional image): two answers each.")],
    rows: RowsOpt = None,
    vector: VectorOpt = [],  # noqa: B006
    scale: ScaleOpt = [],  # noqa: B006
    layers: LayersOpt = [],  # noqa: B006
    positions: PositionsOpt = "all",
    normalize: NormalizeOpt = True,
    absolute: AbsoluteOpt = False,
    template: Annotated[str, typer.Option(help="Prompt template with {question}.")] = DEFAULT_QA_TEMPLATE,
    chat: ChatOpt = CHAT,
    system_prompt: Annotated[str | None, typer.Option(help="Chat only: a system message.")] = None,
    per_question: Annotated[bool, typer.Option(help="Keep every question's scores in the JSON report.")] = False,
    output: OutputOpt = None,
    markdown: MarkdownOpt = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per scoring forward (rows x length).")] = 2048,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """TruthfulQA binary, MC1 and MC2 (summed answer log-probabilities), unsteered and with each vector."""
    from steering.datasets import TruthfulQAItem, parse_rows, read_jsonl, read_truthfulqa
    from steering.errors import SteeringError
    from steering.tasks.evaluation import QAFormat, TruthfulQARequest, evaluate_truthfulqa

    try:
        if not data.is_file():
            raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
        if data.suffix.lower() == ".jsonl":  # preference examples (images allowed): two answers, the prompt verbatim
            items = [TruthfulQAItem.from_preference(e) for e in read_jsonl(data)]
            template = "{question}" if template == DEFAULT_QA_TEMPLATE else template
        else:
            items = read_truthfulqa(data)
        items = [items[i] for i in parse_rows(rows, len(items))]
        lm = load(model, device, dtype, threads)
        conditions = conditions_from_options(open_store(vector_dir, lm), vector, scale, layers, positions, normalize,
                                             absolute)
        fmt = QAFormat(template, "chat" if chat else "raw", system_prompt)
        req = TruthfulQARequest(items, conditions, fmt, {"path": str(data), "rows": rows}, per_question)
        report = run_with_progress(f"truthfulqa ({len(items)} questions x {len(conditions) + 1} conditions)",
                                    lambda cb: evaluate_truthfulqa(lm, req, chunk_tokens=batch_tokens,
                                                                   images=local_images(), on_progress=cb))
    except SteeringError as exc:
        fail(exc)
    _emit(report, output, markdown, as_json)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, or a ``.jsonl`` file of ``{"prompt": ...}`` objects."""
    from steering.errors import InvalidRequestError

    if not path.is_file():
        raise InvalidRequestError(f"no such file: {path}", param="prompts")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path}:{n}: not JSON: {exc.msg}", param="prompts") from None
            if not isinstance(obj, dict) or set(obj) != {"prompt"} or not isinstance(obj["prompt"], str):
                raise InvalidRequestError(f"{path}:{n}: each line needs exactly one string field 'prompt'",
                                             param="prompts")
            out.append(obj["prompt"])
        else:
            out.append(line.strip())
    return out


@app.command()
def steer(
    prompts: Annotated[Path | None, typer.Option(help="Prompts: a text file (one per line) or .jsonl with "
                                                         "'prompt'.")] = None,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = [],  # noqa: B006
    questions: Annotated[Path | None, typer.Option(help="Use TruthfulQA questions (a CSV) as prompts, filled "
                                                           "into --template.")] = None,
    rows: RowsOpt = None,
    template: Annotated[str, typer.Option(help="With --questions: the prompt template.")] = DEFAULT_QA_TEMPLATE,
    vector: VectorOpt = [],  # noqa: B006
    scale: ScaleOpt = [],  # noqa: B006
    layers: LayersOpt = [],  # noqa: B006
    positions: PositionsOpt = "all",
    normalize: NormalizeOpt = True,
    absolute: AbsoluteOpt = False,
    scorer: Annotated[str, typer.Option(help="Behaviour scorer: sentiment, keywords, or none.")] = "sentiment",
    scorer_param: Annotated[list[str], typer.Option("--scorer-param", help="Scorer parameter key=value "
                                                                           "(repeatable), e.g. words=[\"cat\"].")] = [],  # noqa: B006
    chat: ChatOpt = CHAT,
    system_prompt: Annotated[str | None, typer.Option(help="Chat only: a system message.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 48,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    top_p: float = 1.0,
    seed: Annotated[int, typer.Option(help="Prompt i samples with seed + i under every condition.")] = 0,
    samples: Annotated[int, typer.Option(help="Generations per condition kept in the report.")] = 3,
    output: OutputOpt = None,
    markdown: MarkdownOpt = None,
    batch_size: Annotated[int, typer.Option(help="Generations decoded together.")] = 16,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate steered and unsteered; report the behaviour score and its shift, perplexity of the text under the
    unsteered model (and its ratio to the unsteered text's), and distinct-1/2/3."""
    from steering.backends.hf import EngineConfig, HFEngine
    from steering.errors import SteeringError
    from steering.tasks.evaluation import SteerEvalRequest, prepare_steer, start_steer

    try:
        texts = list(prompt) + (read_prompts(prompts) if prompts is not None else [])
        if questions is not None:
            from steering.datasets import parse_rows, read_truthfulqa

            items = read_truthfulqa(questions)
            texts += [template.format(question=items[i].question) for i in parse_rows(rows, len(items))]
        elif rows is not None:
            raise typer.BadParameter("--rows selects rows of --questions", param_hint="--rows")
        lm = load(model, device, dtype, threads)
        conditions = conditions_from_options(open_store(vector_dir, lm), vector, scale, layers, positions, normalize,
                                             absolute)
        req = SteerEvalRequest(texts, conditions, None if scorer == "none" else scorer, parse_params(scorer_param),
                               chat, system_prompt, max_tokens, temperature, top_p, seed, samples)
        prep = prepare_steer(lm, req)
        with HFEngine(lm, EngineConfig(max_batch_size=batch_size)) as engine:
            def run(cb):
                handle = start_steer(engine, prep)
                while True:
                    try:
                        return handle.result(timeout=0.25)
                    except TimeoutError:
                        cb(handle.progress)
                    except KeyboardInterrupt:
                        handle.cancel()
                        raise

            report = run_with_progress(f"steer ({len(texts)} prompts x {len(conditions) + 1} conditions)", run)
    except SteeringError as exc:
        fail(exc)
    _emit(report, output, markdown, as_json)
