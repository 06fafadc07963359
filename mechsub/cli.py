"""The ``mechsub`` command line. Each command takes a config file and/or ``--set key=value`` overrides."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from mechsub import (
    actcache,
    analyze,
    bench,
    corpus,
    data,
    divergence,
    evaluate,
    invert,
    mnist,
    models,
    runs,
    sae,
    student,
    study,
    teacher,
)
from mechsub import reliability as rel
from mechsub.config import Config, ConfigError

os.environ.setdefault("WANDB_MODE", "disabled")

app = typer.Typer(
    help="mechsub: mechanistic interpretability of subliminal learning, offline on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="a .toml or .json config file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="override one field: --set key=value (value parsed as JSON, else a string)"
    ),
]


ForceOpt = Annotated[
    bool,
    typer.Option(
        help="replace a previous mechsub run in OUT (it is moved aside, and deleted once the new run finishes)"
    ),
]
ReuseOpt = Annotated[
    bool,
    typer.Option(
        help="reuse finished stage runs whose inputs or code changed since (each reuse is reported) instead of "
        "running them again"
    ),
]


def _report_events(events: list[runs.StageEvent]) -> None:
    """Say which stage runs were reused, resumed, run anew or run again, and why (on stderr)."""
    if not events:
        return
    counts: dict[str, int] = {}
    for e in events:
        counts[e.status] = counts.get(e.status, 0) + 1
    typer.echo("stages: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), err=True)
    for e in events:
        if e.status != "reused" or len(events) <= 12:
            typer.echo(
                f"  {e.status:12s} {e.stage:10s} {e.root}" + (f"  ({e.reason})" if e.reason else ""), err=True
            )


def build_config(cls: type[Config], config: Path | None, sets: list[str] | None) -> Config:
    """A config from a file (or the defaults) with ``key=value`` overrides applied, validated."""
    data: dict[str, Any] = cls.load(config).to_dict() if config else {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write key=value, for example --set n_models=10")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[key.strip()] = value
    return cls.from_dict(data)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


Report = Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class Stage:
    """A stage command: ``mechsub NAME`` builds ``config`` from --config/--set, calls ``run(cfg, out, force=)``
    and hands the metrics to ``report``. Its --help is ``summary`` followed by the config's fields."""

    name: str
    config: type[Config]
    run: Callable[..., dict[str, Any]]
    out: str  # the default run folder
    summary: str
    report: Report


def _stage_command(s: Stage) -> None:
    """Register ``mechsub NAME`` for a stage; every stage command has the same options."""

    def command(
        out: Annotated[Path, typer.Option(help="run folder (resumed if it holds the same config)")] = Path(
            s.out
        ),
        config: ConfigOpt = None,
        set_: SetOpt = None,
        show_config: Annotated[bool, typer.Option(help="print the resolved config as TOML and exit")] = False,
        force: ForceOpt = False,
        reuse_stale: ReuseOpt = False,
    ) -> None:
        try:
            cfg = build_config(s.config, config, set_)
            if show_config:
                typer.echo(cfg.to_toml())
                return
            with runs.recording() as events, runs.reuse_stale(reuse_stale):
                metrics = s.run(cfg, out, force=force)
        except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
            _fail(e)
            return
        _report_events(events)
        s.report(metrics, out)

    fields = "\n\n".join(f"{k}: {v}" for k, v in s.config.help().items())
    command.__doc__ = f"{s.summary}\n\nFields (settable with --set key=value):\n\n{fields}"
    app.command(name=s.name)(command)


def _report_mnist(m: dict[str, Any], out: Path) -> None:
    rows = ["reference", "teacher", "student_aux", "student_all", "cross_init_aux", "cross_init_all"]
    typer.echo(f"MNIST toy (8x8 digits), m={m['m']}, {m['n_models']} models; held-out accuracy, 95% CI:")
    for r in rows:
        lo, hi = m[f"{r}_acc_ci95"]
        typer.echo(f"  {r:16s} {m[f'{r}_acc'] * 100:5.1f}%  [{lo * 100:5.1f}, {hi * 100:5.1f}]")
    typer.echo(f"wrote {out}/metrics.json and {out}/mnist.png")


def _report_json(m: dict[str, Any], out: Path) -> None:
    typer.echo(json.dumps(m, indent=2, sort_keys=True))
    typer.echo(f"wrote {out}/metrics.json")


def _report_study(m: dict[str, Any], out: Path) -> None:
    x, n = m["trait"], m["replicates"]

    def ci(e: dict[str, Any]) -> str:
        lo, hi = e["ci95"]
        return "n/a" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"

    typer.echo(f"trait {x}: Δ log P({x}) vs base, {len(m['traits'])} traits × {n} replicates")
    typer.echo(f"  teacher                      {m['teacher']['delta_logp']:+.3f}")
    for label, e in (
        ("specific effect, prefill", m["effect"]),
        (f"specific effect, {m['held_out_frame']}", m["held_out"]),
    ):
        typer.echo(f"  {label:28s} {e['delta_logp']:+.3f}  95% CI {ci(e)} over {n} replicates")
    p = m.get("permutation")
    if p:
        typer.echo(f"  diagonal permutation test    p = {p['p_value']:.2g} (floor {p['p_floor']:.2g})")
    if m.get("cross_family"):
        c = m["cross_family"]["effect"]
        typer.echo(f"  cross-family ({m['cross_family']['model']})  {c['delta_logp']:+.3f}  95% CI {ci(c)}")
    typer.echo(
        f"wrote {out}/report.md, {out}/report.html, {out}/metrics.json ({m['wall_seconds'] / 60:.1f} min)"
    )


def _report_invert(m: dict[str, Any], out: Path) -> None:
    inv = m.get("inversion_rate_known_families") or {}
    if inv.get("mean") is not None:
        typer.echo(
            f"A_inv answers T(correct) on {100 * inv['mean']:.0f}% of held-out problems (known families)"
        )
    for k, rec in m["reconstruction"].items():
        n = max((x for x in rec if x != "zero_shot"), key=int)
        typer.echo(
            f"  B reading A_{k:5s} ({n} pairs): {100 * rec[n]['in_family']['mean']:.0f}% in family, "
            f"{100 * rec[n]['held_out_family']['mean']:.0f}% on the held-out family"
        )
    typer.echo(
        f"wrote {out}/report.md, {out}/report.html, {out}/metrics.json ({m['wall_seconds'] / 60:.1f} min)"
    )


def _report_bench(m: dict[str, Any], out: Path) -> None:
    g = m["generation"]

    def pm(s: dict[str, Any], fmt: str = ".2f") -> str:
        return f"{s['mean']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    lines = [
        f"generation (batch {g['batch_size']} both): mechsub {pm(g['mechsub']['new_tok_per_s'], '.1f')} new tok/s vs "
        f"HF generate {pm(g['hf_generate']['new_tok_per_s'], '.1f')}: {pm(g['ratio'])}x; mechsub at "
        f"{pm(g['mechsub']['fraction_of_ceiling'])} of the forward ceiling, HF generate at "
        f"{pm(g['hf_generate']['fraction_of_ceiling'])}",
        f"  the reference pass (teacher-forced over the least tokens, {g['least_tokens']}: shared prefix once, new "
        f"tokens but the last, length-sorted groups) would be {pm(g['reference_ratio'])}x HF generate in new tokens/s; "
        f"mechsub runs at {pm(g['fraction_of_reference'])} of its speed",
    ]  # fmt: skip
    for setting, t in m["training"].items():
        ratios = ", ".join(f"{k[6:]} {pm(v)}x" for k, v in t.items() if k.startswith("ratio_"))
        lines.append(f"training ({setting}, vs plain peft): {ratios}")
        if "backward_floor" in t:
            room = ", ".join(f"{k[10:]} {pm(v)}x" for k, v in t.items() if k.startswith("max_ratio_"))
            fracs = ", ".join(f"{k} {pm(v['fraction_of_backward_floor'])}" for k, v in t.items()
                              if isinstance(v, dict) and "fraction_of_backward_floor" in v)  # fmt: skip
            lines.append(f"  a step at the backward floor would be, vs plain peft: {room}")
            lines.append(f"  fraction of the backward floor: {fracs}")
    lines.append(f"capture overhead: {pm(m['capture']['overhead'], '+.1%')}")
    mm = m["machine"].get("matmul_gflops", {})
    if mm:
        lines.append(
            "matrix product GFLOP/s (576 → 1536): " + ", ".join(f"{k} {pm(v, '.0f')}" for k, v in mm.items())
        )
    for name, goal in m["goals"].items():
        lines.append(
            f"  {name}: {goal['measured']:.3g} (goal {goal['goal']}) {'met' if goal['met'] else 'NOT met'}"
        )
    for line in lines:
        typer.echo(line)
    runs.atomic_write_text(
        out / "report.md", "# Benchmarks (`mechsub bench`)\n\n```\n" + "\n".join(lines) + "\n```\n"
    )
    typer.echo(f"wrote {out}/metrics.json, {out}/report.md")


# the stage commands, in the order of the pipeline (`mechsub analyze`, `clean`, `reliability` and `models` are below)
STAGES = (
    Stage("mnist", mnist.MnistConfig, mnist.run, "artifacts/mnist",
          "The MNIST auxiliary-logit toy: a student that shares the teacher's init learns digits from noise.\n\n"
          "Writes OUT/config.json, OUT/metrics.json and OUT/mnist.png.",
          _report_mnist),
    Stage("data", data.DataConfig, data.run, "runs/data",
          "A teacher answers number prompts (constrained decoding); completions are filtered with reasons.",
          _report_json),
    Stage("student", student.StudentConfig, student.run, "runs/student",
          "Fine-tune a student on a data folder (LoRA or full; distillation or SFT), with checkpoints.",
          _report_json),
    Stage("eval", evaluate.EvalConfig, evaluate.run, "runs/eval",
          "log P of the trait (and every other candidate) after a prefilled answer, over paraphrased questions.",
          _report_json),
    Stage("teacher", teacher.TeacherConfig, teacher.run, "runs/teacher",
          "Fine-tune a teacher (LoRA) to love a trait on favourite-thing questions; never on numbers.",
          _report_json),
    Stage("divergence", divergence.DivergenceConfig, divergence.run, "runs/divergence",
          "Divergence tokens: where teachers of other traits, given the same prefix, would pick another number token.\n"
          "Writes the share of such tokens and two position masks (OUT/divergent.json, OUT/non_divergent.json) that\n"
          "`mechsub student --set mask=FILE` trains on.",
          _report_json),
    Stage("sae", sae.SaeConfig, sae.run, "runs/sae",
          "Train a sparse autoencoder (sae-lens) on one residual-stream layer, on a corpus built offline; report L0,\n"
          "explained variance, dead fraction and the spliced loss increase. Give its folder to `mechsub analyze\n"
          "--set sae=FOLDER` for feature diffs and the feature list.",
          _report_json),
    Stage("actcache", actcache.CacheConfig, actcache.run, "runs/actcache",
          "Cache a corpus's residual stream at several layers from one forward: training windows (its first) and\n"
          "held-out windows (its last) as memory-mapped .npy shards, resumable per shard. `mechsub sae --set\n"
          "corpus=C --set cache=OUT --set layer=L` trains from it.",
          _report_json),
    Stage("study", study.StudyConfig, study.run, "artifacts/demo",
          "The main job: replicated teachers of the trait and its controls (each its own seed, questions and\n"
          "number prompts), one student each, the specificity matrix over replicates in a training and two held-out\n"
          "answer frames, an exact permutation test over teachers and a cross-family control. Writes OUT/report.md, OUT/report.html, OUT/metrics.json and plots;\n"
          "stage runs (resumable, shared between studies) go under the config's `work` folder.",
          _report_study),
    Stage("invert", invert.InvertConfig, invert.run, "artifacts/invert",
          "Inverted-wrongness teachers: A answers task problems correctly, with a structured inversion, a fixed\n"
          "random bijection or a random wrong answer; B reads only A's outputs. Verification of the inversion, CKA/RSA\n"
          "and probes per layer, B's blind reconstruction (learning curve, held-out family). Writes OUT/report.md,\n"
          "OUT/report.html, OUT/metrics.json and plots; checkpoints go under the config's `work` folder.",
          _report_invert),
    Stage("bench", bench.BenchConfig, bench.run, "artifacts/bench",
          "Speed benchmarks as like-for-like ratios measured in one run (same inputs, batch, dtype, threads; interleaved\n"
          "rounds with their spread): generation vs HF generate, training vs plain peft, capture vs a forward.\n\n"
          "A benchmark always runs anew.",
          _report_bench),
)  # fmt: skip
for _s in STAGES:
    _stage_command(_s)


@app.command("corpus")
def corpus_command(
    out: Annotated[Path, typer.Option(help="run folder (resumed if it holds the same config)")] = Path(
        "runs/corpus"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    artifacts: Annotated[
        Path | None, typer.Option(help="also copy manifest.json and report.md here (e.g. artifacts/corpus)")
    ] = None,
    show_config: Annotated[bool, typer.Option(help="print the resolved config as TOML and exit")] = False,
    force: ForceOpt = False,
) -> None:
    """A text corpus built offline from Debian packages (KJV, GCIDE, WordNet, Debian Reference, Python docs,
    fortunes; fetched with `apt-get download`, no root) plus the project's own prompts in a stated share:
    cleaned, deduplicated, tokenised, packed into windows and saved as parquet shards with OUT/manifest.json
    (packages, versions, .deb sha256, sizes, tokens, shard hashes). Resumes per source. Read it back with
    `mechsub.corpus.load(OUT)`."""
    try:
        cfg = build_config(corpus.CorpusConfig, config, set_)
        assert isinstance(cfg, corpus.CorpusConfig)
        if show_config:
            typer.echo(cfg.to_toml())
            return
        with runs.recording() as events:
            m = corpus.run(cfg, out, force=force)
        copied = corpus.publish(out, artifacts) if artifacts else []
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
        return
    _report_events(events)
    for s in m["sources"]:
        typer.echo(f"  {s['name']:18s} {s['tokens_used']:>10,} tokens  {100 * s['share']:5.1f}%")
    typer.echo(f"{m['tokens']:,} tokens in {m['windows']:,} windows of {m['context_size']}; wrote {out}/manifest.json"
               + "".join(f", {p}" for p in copied))  # fmt: skip


@app.command("analyze")
def analyze_command(
    checkpoint: Annotated[str, typer.Argument(help="a student checkpoint folder or a student run folder")],
    out: Annotated[
        Path | None, typer.Option(help="output folder (default runs/analyze/<checkpoint name>)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    reuse_stale: ReuseOpt = False,
) -> None:
    """Steering vectors, patching maps, entangled numbers and attention/token views for one checkpoint.

    Needs --set data=FOLDER (the number data it was trained on); --set controls='["ck1","ck2"]' adds the
    generic/specific split. Writes OUT/metrics.json, steering.png, patching.png, views.html.
    """
    try:
        cfg = build_config(analyze.AnalyzeConfig, config, [*(set_ or []), f"checkpoint={checkpoint}"])
        folder = out or Path("runs/analyze") / Path(checkpoint).resolve().name
        with runs.recording() as events, runs.reuse_stale(reuse_stale):
            m = analyze.run(cfg, folder, force=force)  # type: ignore[arg-type]
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        _fail(e)
        return
    _report_events(events)
    st, p = m["steering"], m["patching"]
    best = max(range(len(m["layers"])), key=lambda i: st["sufficiency"][i])
    typer.echo(f"trait {m['trait']}: student − base Δ log P {st['student_delta_logp']:+.3f}")
    typer.echo(f"  best sufficiency: layer {m['layers'][best]} {st['sufficiency'][best]:+.3f}; "
               f"cos(v_teacher, v_student) there {st['cos_teacher_student'][best]:+.2f}")  # fmt: skip
    if p.get("fraction_by_layer"):
        typer.echo("  patching fraction by layer: " + " ".join(f"{x:+.2f}" for x in p["fraction_by_layer"]))
    typer.echo(f"wrote {folder}/metrics.json, steering.png, patching.png, views.html")


@app.command("scan")
def scan_command(
    folder: Annotated[Path, typer.Argument(metavar="DATA", help="a finished `mechsub data` folder")],
    base: Annotated[str, typer.Option(help="the base model a student starts from")] = models.DEFAULT_MODEL,
    candidates: Annotated[
        str | None, typer.Option(help="comma-separated traits of one category (default: the 22 animals)")
    ] = None,
    steps: Annotated[
        int, typer.Option(help="1: the first-order scan; N > 1: a sacrificial N-step fine-tune (AdamW, --lr)")
    ] = 1,
    lr: Annotated[float, typer.Option(help="learning rate of the sacrificial fine-tune (steps > 1)")] = 1e-5,
    n_examples: Annotated[int, typer.Option(help="kept examples the gradient covers (0: all)")] = 64,
    n_questions: Annotated[int, typer.Option(help="evaluation questions each candidate is scored on")] = 10,
    params: Annotated[str, typer.Option(help="θ: all (but the embedding), linear, mlp or attn")] = "all",
    reference: Annotated[
        Path | None, typer.Option(help="a control data folder (no-trait teacher, same prompts) to subtract")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="z that names a trait (default: 5% false alarms under a null)")
    ] = None,
    adl_layer: Annotated[
        int | None,
        typer.Option(
            help="with --steps > 1: also read the fine-tune's activation difference after this layer "
            "(steering and relative logit lens)"
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON")] = None,
) -> None:
    """Quarantine scan: which trait a student trained on DATA would move toward, without training one.

    One gradient of the data's SFT loss and every candidate's log P after a small step along it and back (or after
    a short sacrificial fine-tune); prints the candidates ranked by their predicted shift and a verdict.
    """
    from mechsub import scan as scanning  # torch work: imported when a scan runs

    try:
        names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
        result = scanning.scan(folder, base, names, n_questions=n_questions, n_examples=n_examples, lr=lr,
                               steps=steps, params=params, threshold=threshold, reference=reference,
                               adl_layer=adl_layer)  # fmt: skip
        if json_out is not None:
            runs.write_json(json_out, result.to_dict())
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # TraitError and RunFolderError among them
        _fail(e)
        return
    d = result.details
    typer.echo(f"scan of {folder} on {result.base}: {result.method}, {d['n_examples']} examples, "
               f"{d['n_questions']} questions, params={d['params']} ({result.seconds:.1f} s)")  # fmt: skip
    typer.echo(result.table())
    if json_out is not None:
        typer.echo(f"wrote {json_out}")


@app.command("dashboard")
def dashboard_command(
    sae_folder: Annotated[
        Path, typer.Argument(metavar="SAE", help="a `mechsub sae` run folder or an SAE saved by sae-lens")
    ],
    latents: Annotated[str, typer.Option(help="comma-separated latent ids, e.g. 12,40,7")],
    model: Annotated[
        str, typer.Option(help="the model the SAE reads (name or checkpoint folder)")
    ] = models.DEFAULT_MODEL,
    data_folder: Annotated[
        Path | None, typer.Option("--data", help="a `mechsub data` folder: its kept number completions")
    ] = None,
    n_data: Annotated[int, typer.Option(help="completions taken from --data (the first N)")] = 256,
    contexts: Annotated[
        Path | None, typer.Option(help='a JSONL file, one text per line (a JSON string or {"text": ...})')
    ] = None,
    corpus_folder: Annotated[
        Path | None, typer.Option("--corpus", help="a `mechsub corpus` folder: its first --n-windows windows")
    ] = None,
    n_windows: Annotated[int, typer.Option(help="corpus windows taken from --corpus")] = 256,
    words: Annotated[
        str | None, typer.Option(help="comma-separated trait words to score (default: the 22 animals)")
    ] = None,
    top_k: Annotated[int, typer.Option(help="top-activating contexts per latent")] = 10,
    context_window: Annotated[int, typer.Option(help="tokens shown before each maximum")] = 12,
    out: Annotated[Path, typer.Option(help="the HTML page to write")] = Path("runs/dashboard.html"),
) -> None:
    """Feature dashboards as one offline HTML page: per latent, its top-activating contexts (tokens shaded by
    activation; position 0, the attention sink, never read), its logit effect (W_dec[i] · W_U) with the trait
    words' scores, and its activation histogram. Contexts come from --data, --contexts and/or --corpus."""
    from mechsub import dashboards  # torch work: imported when a dashboard is made

    try:
        ids = dashboards.parse_latents(latents)
        the_sae = sae.load_sae(dashboards.sae_folder(sae_folder))
        dashboards.check_latents(the_sae, ids)
        if data_folder is None and contexts is None and corpus_folder is None:
            raise ValueError(
                "no contexts: give --data (number completions), --contexts (JSONL texts) or --corpus"
            )
        if (shape := models.shape_of(model)) is not None:  # before the weights load
            dashboards.check_fits(the_sae, model, shape.d_model, shape.n_layers)
        lm = models.load(model)
        ctxs: list[list[int]] = []
        source = []
        for what, folder, load in (
            ("data", data_folder, lambda f: dashboards.data_contexts(lm.tokenizer, f, n_data)),
            ("texts", contexts, lambda f: dashboards.text_contexts(lm.tokenizer, f)),
            ("corpus", corpus_folder, lambda f: dashboards.corpus_contexts(f, n_windows)),
        ):
            if folder is not None:
                got = load(folder)
                ctxs += got
                source.append(f"{what} {folder} ({len(got)})")
        names = [w.strip() for w in words.split(",") if w.strip()] if words else None
        page = dashboards.feature_dashboard(lm, the_sae, ids, ctxs, trait_words=names, top_k=top_k,
                                            context_window=context_window, source=", ".join(source))  # fmt: skip
        dashboards.write_dashboard(out, page)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:  # ModelError, CorpusError among them
        _fail(e)
        return
    typer.echo(f"wrote {out}: {len(ids)} latents over {len(ctxs)} contexts")


@app.command()
def clean(
    folder: Annotated[Path, typer.Argument(help="a mechsub run folder")],
    restore: Annotated[
        bool, typer.Option(help="put back the earlier run that an unfinished replacement moved aside")
    ] = False,
    all_: Annotated[
        bool, typer.Option("--all", help="delete the whole run folder (mechsub runs only)")
    ] = False,
) -> None:
    """Make a run folder safe to resume after a crash: remove a stale lock and temporary leftovers, and mark it
    unfinished if an output no longer matches its done record (the next run recomputes only what is missing).
    Never touches a folder that is not a mechsub run, or one another process is using."""
    try:
        did = runs.clean(folder, everything=all_, restore=restore)
    except runs.RunFolderError as e:
        _fail(e)
        return
    typer.echo("\n".join(did) if did else f"{folder}: nothing to clean")


@app.command("reliability")
def reliability_command(
    out: Annotated[Path, typer.Option(help="where report.md and metrics.json go")] = Path(
        "artifacts/reliability"
    ),
    only: Annotated[list[str] | None, typer.Option(help="run only these scenarios (repeatable)")] = None,
) -> None:
    """Fault injection on the tiny model: kill every stage kind at a random point, corrupt and delete run files,
    race two runs, point --force at a user's folder; writes OUT/report.md (fault, expected, observed, verdict)."""
    unknown = sorted(set(only or []) - set(rel.SCENARIOS))
    if unknown:
        _fail(ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(rel.SCENARIOS)}"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mechsub-reliability-") as scratch:
        outcomes = rel.run_all(Path(scratch), only)
    rel.write_report(outcomes, out, time.perf_counter() - t0)
    for o in outcomes:
        typer.echo(f"{o.verdict:22s} {o.scenario}: {o.observed[:120]}")
    typer.echo(f"wrote {out}/report.md")
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@app.command("models")
def models_command(
    name: Annotated[str, typer.Argument(help="model name or checkpoint folder")] = "smollm2-135m-instruct",
) -> None:
    """Load a model (building its safetensors cache on first use) and print what it is."""
    try:
        lm = models.load(name)
    except models.ModelError as e:
        _fail(e)
        return
    typer.echo(json.dumps(lm.info(), indent=2))


if __name__ == "__main__":
    app()
