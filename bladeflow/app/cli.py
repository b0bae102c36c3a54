"""The ``bladeflow`` command line.

Heavy imports (Prefect, MLflow, ONNX Runtime) happen inside commands, after the settings have
exported ``PREFECT_HOME`` and friends: importing Prefect earlier would create ``~/.prefect``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import typer

from bladeflow.app import release_cli
from bladeflow.app.common import (
    HOME_OPTION,
    TRACKING_OPTION,
    fail,
    params_or_exit,
    quiet_user_error_tracebacks,
    say,
    settings_from,
)
from bladeflow.app.console import NORMAL, QUIET, VERBOSE, RunConsole, attach_log
from bladeflow.app.options import batch_sizes as parse_batch_sizes
from bladeflow.app.options import dynamic_axes as parse_dynamic_axes
from bladeflow.app.options import input_shapes as parse_input_shapes
from bladeflow.app.options import print_result
from bladeflow.app.preflight import check_experiment, check_optimize_input
from bladeflow.app.serve_cli import serve
from bladeflow.app.stack_cli import down as stack_down
from bladeflow.app.stack_cli import up as stack_up
from bladeflow.app.tune_cli import tune_serving
from bladeflow.core.errors import AccuracyGateError, BladeflowError, UserInputError
from bladeflow.core.settings import Settings

app = typer.Typer(
    name="bladeflow",
    help="Make trained models fast to serve and safe to ship: convert -> optimize -> "
    "accuracy-validate -> benchmark -> register in MLflow -> staged gray release, and serve "
    "what the registry says.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings reflow to the terminal: paragraphs, not hard lines
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bladeflow {version('bladeflow')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Make trained models fast to serve and safe to ship."""


# `optimize --must-beat`: the chosen candidate was not faster than that version; nothing registered.
EXIT_NOT_IMPROVED = 6


@app.command()
def optimize(
    source: str = typer.Argument(
        ...,
        help="Model to optimize: .onnx; TF SavedModel folder; Keras .keras/.h5; TorchScript "
        ".pt/.ts; torch.export .pt2; 'pkg.module:factory'; Hugging Face model folder; "
        "scikit-learn .skops; Caffe .prototxt (+ .caffemodel); MLflow URI (models:/NAME/VERSION, "
        "models:/NAME@ALIAS, runs:/RUN/PATH).",
    ),
    name: str = typer.Option(
        ..., "--name", "-n", help="Registered model name in MLflow (letters, digits, _ - .)."
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="Validation data: .npz or a folder of .npy (one array per model input, samples "
        "along axis 0), or .parquet/.csv/.jsonl (columns = inputs or text columns). Without "
        "it, inputs are synthesized from the signature (cannot judge quantization).",
    ),
    labels_column: str | None = typer.Option(
        None, "--labels-column", help="Column/array of labels in --data, for task metrics."
    ),
    text_column: list[str] = typer.Option(
        [],
        "--text-column",
        help="Text column of --data to tokenize with the model's tokenizer (give two for a "
        "text pair).",
    ),
    calibration_data: Path | None = typer.Option(
        None, "--calibration-data", help="Separate data for int8 static calibration."
    ),
    min_rows: int = typer.Option(1, "--min-rows", help="Fewest validation samples accepted."),
    batch_sizes: str = typer.Option(
        "1,8,32", "--batch-sizes", "-b", help="Comma-separated batch sizes to benchmark."
    ),
    objective: str = typer.Option(
        "latency@1",
        "--objective",
        help="What 'fastest' means: latency@BATCH (lowest p50) or throughput@BATCH.",
    ),
    passes: str | None = typer.Option(
        None,
        "--passes",
        help="Candidate recipes instead of the preset's: ',' between recipes, '+' between "
        "passes, ':' then key=value;... for options, '|' between list items. E.g. "
        "'ort_graph:level=all', 'int8_static:op_types=Conv|MatMul'.",
    ),
    preset: str = typer.Option("cpu", "--preset", help="Which recipes to try (cpu)."),
    model_format: str | None = typer.Option(
        None,
        "--format",
        help="Source format when the path does not tell (onnx, tf_savedmodel, keras, "
        "torchscript, torch_export, torch_callable, huggingface, sklearn, caffe, mlflow).",
    ),
    signature: str | None = typer.Option(
        None,
        "--signature",
        help="TensorFlow SavedModel serving signature (default: serving_default).",
    ),
    input_shape: list[str] = typer.Option(
        [],
        "--input-shape",
        help="NAME:DIMS fixing an input's example shape, e.g. pixels:1x3x224x224 (repeatable). "
        "Needed for TorchScript sources.",
    ),
    dynamic_axes: str | None = typer.Option(
        None,
        "--dynamic-axes",
        help='JSON {name: {axis: dim_name}} for exporters, e.g. \'{"x": {"0": "batch"}}\'; '
        "'{}' exports fixed shapes (default: batch and sequence dynamic).",
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Caffe: the .caffemodel for a .prototxt SOURCE (default: the same stem beside it).",
    ),
    keep_initializer_inputs: bool = typer.Option(
        False,
        "--keep-initializer-inputs",
        help="ONNX: keep weights that old exporters also list as graph inputs (default: removed, "
        "so ONNX Runtime can fold them).",
    ),
    target_opset: int | None = typer.Option(
        None, "--target-opset", help="ONNX opset to export to, or to upgrade an ONNX model to."
    ),
    accuracy: str | None = typer.Option(
        None,
        "--accuracy",
        help="Accuracy budget: limits on how far a candidate may move each output, e.g. "
        "'cosine>=0.99' (embeddings), 'argmax>=0.995,prob_drift<=0.02' (classifiers), "
        "'abs<=0.02' or 'decision>=0.99@0.5' (scores), 'metric_drop<=0.005' (with labels); "
        "'OUTPUT:' before a limit confines it to one output. Default: chosen per output from "
        "what it is (printed at the start); --atol/--rtol/--min-cosine instead: the exact "
        "elementwise gate.",
    ),
    atol: float | None = typer.Option(
        None,
        "--atol",
        "--max-abs-error",
        help="Exact gate: absolute error allowed per element [default: 1e-4 when any of "
        "--atol/--rtol/--min-cosine is given].",
    ),
    rtol: float | None = typer.Option(
        None, "--rtol", help="Exact gate: error allowed relative to |source| [default: 1e-3]."
    ),
    min_cosine: float | None = typer.Option(
        None,
        "--min-cosine",
        help="Exact gate: lowest per-sample cosine similarity to the source [default: 0.999].",
    ),
    recovery_budget: float = typer.Option(
        300.0,
        "--recovery-budget",
        help="Seconds accuracy recovery may spend per recipe keeping sensitive nodes in fp32.",
    ),
    bench_rounds: int = typer.Option(5, "--bench-rounds", help="Interleaved benchmark rounds."),
    benchmark_work_pool: str | None = typer.Option(
        None,
        "--benchmark-work-pool",
        help="Run the benchmark on this Prefect work pool (workers on the target hardware, via "
        "its benchmark-on-POOL deployment); needs a Prefect server (PREFECT_API_URL).",
    ),
    must_beat: str | None = typer.Option(
        None,
        "--must-beat",
        help="Register only if faster than this version of --name (number or alias, e.g. "
        "champion), timed in the same benchmark; else exit 6 with nothing registered.",
    ),
    min_speedup: float = typer.Option(
        1.0, "--min-speedup", help="With --must-beat: the speedup required at the objective."
    ),
    bench_iterations: int = typer.Option(
        20, "--bench-iterations", help="Timed runs per model, batch size and round."
    ),
    release: bool = typer.Option(
        False,
        "--release",
        help="After registering, start a staged release of the new version (needs a running "
        "`bladeflow serve`; see `bladeflow release start --help`).",
    ),
    release_plan: str = typer.Option(
        "default", "--release-plan", help="Release plan: default, fast, or a .json/.yaml file."
    ),
    approval: bool = typer.Option(
        False, "--approval", help="With --release: pause for approval in the Prefect UI."
    ),
    tune_serving: bool = typer.Option(
        False,
        "--tune-serving",
        help="After registering, tune `bladeflow serve` for the new version like `bladeflow "
        "tune-serving` (real server, open-loop load): the winner becomes its "
        "bladeflow.serving_config tag, capacity goes in its description and the result; runs "
        "before --release. A failed tune leaves the version registered and says why.",
    ),
    tune_slo_p99_ms: float | None = typer.Option(
        None,
        "--tune-slo-p99-ms",
        help="With --tune-serving: the p99 latency (ms) a sustained rate must keep [default: 100].",
    ),
    tune_budget_s: float | None = typer.Option(
        None,
        "--tune-budget-s",
        help="With --tune-serving: seconds for the whole search, the source's included (at "
        "least 40; under 100 the source is not searched) [default: 300].",
    ),
    tune_target_qps: float | None = typer.Option(
        None,
        "--tune-target-qps",
        help="With --tune-serving: requests/s the capacity numbers (cores needed) plan for "
        "[default: 1000].",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout (progress stays on stderr)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Prefect's task logs and third-party warnings live."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
    home: Path | None = HOME_OPTION,
    tracking_uri: str | None = TRACKING_OPTION,
) -> None:
    """Optimize SOURCE and register the fastest candidate that passes the accuracy gate.

    Exit codes: 0 registered (and released, with --release); 2 bad input (nothing registered);
    3 no candidate passed the accuracy gate (nothing registered; the MLflow run records why),
    or with --release the release was rolled back; 4 MLflow unusable; 5 another release of the
    model is in progress; 6 with --must-beat, not faster than that version (nothing registered).
    """
    settings = settings_from(home, tracking_uri)
    try:
        gate = _gate_options(accuracy, atol, rtol, min_cosine)
        params = optimize_params(
            source=source,
            name=name,
            data=str(data) if data else None,
            labels_column=labels_column,
            text_columns=text_column or None,
            calibration=str(calibration_data) if calibration_data else None,
            min_rows=min_rows,
            format=model_format,
            signature=signature,
            input_shapes=parse_input_shapes(input_shape),
            dynamic_axes=parse_dynamic_axes(dynamic_axes),
            target_opset=target_opset,
            weights=str(weights) if weights else None,
            keep_initializer_inputs=keep_initializer_inputs,
            batch_sizes=parse_batch_sizes(batch_sizes),
            recovery_budget_s=recovery_budget,
            objective=objective,
            passes=passes,
            preset=preset,
            **gate,
            bench={"rounds": bench_rounds, "iterations": bench_iterations},
            benchmark_work_pool=benchmark_work_pool,
            must_beat=must_beat,
            min_speedup=min_speedup,
            **_tune_options(tune_serving, tune_slo_p99_ms, tune_budget_s, tune_target_qps),
            tracking_uri=settings.tracking_uri,
        )
        check_optimize_input(params)
        if not quiet:
            say(_budget_line(params))
        result = _run_optimize(params, _verbosity(verbose, quiet))
    except BladeflowError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        print_result(result, settings, quiet)
        if tune_serving:
            typer.echo(_tune_line(result))
    if result.outcome == "not_improved":
        raise typer.Exit(EXIT_NOT_IMPROVED)
    if release:
        release_cli.start(
            name=result.name,
            version=result.version,
            plan=release_plan,
            approval=approval,
            endpoint=[],
            actor=None,
            as_json=False,
            home=home,
            tracking_uri=settings.tracking_uri,
        )


@app.command()
def demo(
    tune_serving: bool = typer.Option(
        False,
        "--tune-serving",
        help="Also tune `bladeflow serve` for the registered matcher (real server, open-loop "
        "load, about --tune-budget-s more) and print its capacity: the sustained rate per core "
        "at the SLO, and the cores it saves against the unoptimized model.",
    ),
    tune_budget_s: float | None = typer.Option(
        None,
        "--tune-budget-s",
        help="With --tune-serving: seconds for the search, the source's included (at least 40; "
        "under 100 the source is not searched) [default: 300].",
    ),
    tune_slo_p99_ms: float | None = typer.Option(
        None,
        "--tune-slo-p99-ms",
        help="With --tune-serving: the p99 latency (ms) a sustained rate must keep [default: 100].",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Prefect's task logs and third-party warnings live."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
    home: Path | None = HOME_OPTION,
    tracking_uri: str | None = TRACKING_OPTION,
) -> None:
    """Optimize and register all-MiniLM-L6-v2 as a semantic matcher; print the table.

    The pretrained encoder becomes a two-text similarity model (bladeflow.app.matcher), validated on
    300 real sentence pairs, benchmarked against PyTorch as it is served (inference_mode, the
    candidates' thread count).
    """
    import os

    from bladeflow.app.matcher import (
        MATCHER_ACCURACY,
        MATCHER_NAME,
        MATCHER_SOURCE,
        build_validation_set,
        minilm_dir,
    )

    settings = settings_from(home, tracking_uri)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = settings.home / "demo"
    try:
        tune = _tune_options(tune_serving, tune_slo_p99_ms, tune_budget_s, None)
        check_experiment(settings.tracking_uri)
        minilm_dir()  # exit 2 with the pip hint before any work
        data = build_validation_set(folder / "validation.npz")
        say(
            f"demo: {MATCHER_SOURCE} (all-MiniLM-L6-v2 as a query/answer matcher); sentence "
            f"pairs in {data} and {folder / 'pairs.jsonl'}"
        )
        params = optimize_params(
            source=MATCHER_SOURCE,
            name=MATCHER_NAME,
            data=str(data),
            accuracy=MATCHER_ACCURACY,  # judged as a matcher: its decisions and its score
            tracking_uri=settings.tracking_uri,
            **tune,
        )
        result = _run_optimize(params, _verbosity(verbose, quiet), command="demo")
    except BladeflowError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        print_result(result, settings, quiet)
        if tune_serving:
            typer.echo(_tune_line(result))


@app.command()
def info(home: Path | None = HOME_OPTION, tracking_uri: str | None = TRACKING_OPTION) -> None:
    """Show the resolved settings, this machine's hardware fingerprint and tool versions."""
    import json

    from bladeflow.core.environment import hardware, tool_versions

    settings = Settings.from_env(home=home, tracking_uri=tracking_uri)
    typer.echo(
        json.dumps(
            {
                "home": str(settings.home),
                "tracking_uri": settings.tracking_uri,
                "registry_uri": settings.registry_uri,
                "artifact_root": settings.artifact_root,
                "prefect_home": str(settings.prefect_home),
                "hardware": hardware(),
                "versions": tool_versions(),
            },
            indent=2,
        )
    )


app.command(name="serve")(serve)
app.command(name="tune-serving")(tune_serving)
app.command(name="up")(stack_up)
app.command(name="down")(stack_down)

release_app = typer.Typer(
    name="release",
    help="Staged gray release of a validated version: shadow -> 5% -> 25% -> 50% -> 100%, gated "
    "by live serving metrics, rolled back automatically when a gate fails.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
for _command in (release_cli.start, release_cli.status, release_cli.promote, release_cli.rollback):
    release_app.command()(_command)
app.add_typer(release_app)


def _gate_options(
    accuracy: str | None, atol: float | None, rtol: float | None, min_cosine: float | None
) -> dict[str, Any]:
    """``accuracy`` (checked here, so a bad one exits 2 listing the accepted forms) or an
    explicit ``tolerance`` from --atol/--rtol/--min-cosine; neither: the default budget."""
    from bladeflow.core.budget import parse_budget

    given = {
        k: v
        for k, v in {"atol": atol, "rtol": rtol, "min_cosine": min_cosine}.items()
        if v is not None
    }
    if accuracy is not None and given:
        raise UserInputError(
            "--accuracy and --atol/--rtol/--min-cosine exclude each other: give the budget "
            "(e.g. --accuracy 'cosine>=0.99'), or the exact elementwise gate"
        )
    if accuracy is not None:
        return {"accuracy": parse_budget(accuracy).text()}
    return {"tolerance": given} if given else {}


def _tune_options(
    tune: bool, slo_p99_ms: float | None, budget_s: float | None, target_qps: float | None
) -> dict[str, Any]:
    """``tune_serving`` and the ``tune`` settings given; a --tune-* value without
    --tune-serving is refused rather than ignored."""
    given = {
        k: v
        for k, v in {
            "slo_p99_ms": slo_p99_ms,
            "budget_s": budget_s,
            "target_qps": target_qps,
        }.items()
        if v is not None
    }
    if given and not tune:
        flags = ", ".join("--tune-" + k.replace("_", "-") for k in given)
        raise UserInputError(
            f"without --tune-serving, {flags} would be ignored: add --tune-serving, or leave "
            f"{'it' if len(given) == 1 else 'them'} out"
        )
    return {"tune_serving": True, "tune": given} if tune else {}


def _tune_line(result: Any) -> str:
    """What --tune-serving did, for the human-readable result."""
    config, capacity = result.serving_config, result.capacity or {}
    if not config:
        return f"\nServing not tuned: {result.serving_tune_reason}"
    knobs = " ".join(
        f"{k}={config[k]}"
        for k in ("max_batch_size", "batch_timeout_ms", "workers", "intra_op_threads")
        if k in config
    )
    line = (
        f"\nServing tuned (tag bladeflow.serving_config): {knobs}; sustains "
        f"{config.get('sustained_qps')} requests/s at p99 <= {config.get('slo_p99_ms')} ms "
        f"(defaults: {config.get('default_qps')})"
    )
    if capacity.get("saved_percent") is not None:
        line += f"; {capacity['saved_percent']:g} % fewer cores than the source"
    return line


def _budget_line(params: Any) -> str:
    """What the gate will judge, said before any work (the resolved one follows in progress)."""
    budget = params.accuracy_budget()
    if budget is None:
        t = params.tolerance
        return (
            f"accuracy budget: exact, |candidate - source| <= {t.atol:g} + {t.rtol:g}*|source| "
            f"and cosine >= {t.min_cosine:g} on every sample"
        )
    if budget.auto:
        from bladeflow.core.budget import DEFAULT_BUDGETS

        kinds = "; ".join(f"{k.value}: {v}" for k, v in DEFAULT_BUDGETS.items())
        return (
            f"accuracy budget: the default for each output's kind ({kinds}), chosen once the "
            "source's outputs are computed"
        )
    return f"accuracy budget: {budget.text()} (--accuracy)"


def optimize_params(**kwargs: Any) -> Any:
    from bladeflow.core.params import OptimizeParams

    return params_or_exit(OptimizeParams, **kwargs)


def _verbosity(verbose: bool, quiet: bool) -> int:
    if verbose and quiet:
        raise fail(UserInputError("--verbose and --quiet exclude each other: give one"))
    return VERBOSE if verbose else QUIET if quiet else NORMAL


def _run_optimize(params: Any, verbosity: int = NORMAL, command: str = "optimize") -> Any:
    from bladeflow.app.orchestration import use_prefect_api

    settings = Settings.from_env()
    talk = say if verbosity > QUIET else None
    if talk:
        talk(
            f"optimize: {params.source} -> registered model {params.name!r} "
            f"(tracking {params.tracking_uri})"
        )
    use_prefect_api(settings, talk)  # before Prefect is imported
    from bladeflow.flows.optimize import optimize_flow

    quiet_user_error_tracebacks()
    console = RunConsole(settings.home, command, verbosity)
    run_id = None
    try:
        # Prefect and MLflow print to stdout; keep stdout for the result (e.g. --json).
        with console, contextlib.redirect_stdout(sys.stderr):
            result = optimize_flow(params)
        run_id = result.run_id
        return result
    except AccuracyGateError as exc:
        run_id = exc.run_id
        raise
    finally:
        attach_log(settings, run_id, console.log_path)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
