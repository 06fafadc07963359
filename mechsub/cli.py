"""The ``mechsub`` command line. Each command takes a config file and/or ``--set key=value`` overrides."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

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


def _stage_command(
    name: str,
    config_cls: str,
    runner: str,
    default_out: str,
    summary: str,
    report: Callable[[dict[str, Any], Path], None],
) -> None:
    """Register ``mechsub NAME``: build the stage's config from --config/--set, run it, print a summary.

    Every stage command has the same options; its --help is ``summary`` followed by the config's fields.
    """
    import importlib

    module_name, cls_name = config_cls.rsplit(".", 1)
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)

    def command(
        out: Annotated[Path, typer.Option(help="run folder (resumed if it holds the same config)")] = Path(
            default_out
        ),
        config: ConfigOpt = None,
        set_: SetOpt = None,
        show_config: Annotated[bool, typer.Option(help="print the resolved config as TOML and exit")] = False,
        force: Annotated[bool, typer.Option(help="delete a previous run in OUT and start over")] = False,
    ) -> None:
        try:
            cfg = build_config(cls, config, set_)
            if show_config:
                typer.echo(cfg.to_toml())
                return
            metrics = getattr(module, runner)(cfg, out, force=force)
        except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
            _fail(e)
            return
        report(metrics, out)

    fields = "\n\n".join(f"{k}: {v}" for k, v in cls.help().items())
    command.__doc__ = f"{summary}\n\nFields (settable with --set key=value):\n\n{fields}"
    app.command(name=name)(command)


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


_stage_command(
    "mnist", "mechsub.mnist.MnistConfig", "run", "artifacts/mnist",
    "The MNIST auxiliary-logit toy: a student that shares the teacher's init learns digits from noise.\n\n"
    "Writes OUT/config.json, OUT/metrics.json and OUT/mnist.png.",
    _report_mnist,
)  # fmt: skip
_stage_command(
    "data", "mechsub.data.DataConfig", "run", "runs/data",
    "A teacher answers number prompts (constrained decoding); completions are filtered with reasons.",
    _report_json,
)  # fmt: skip
_stage_command(
    "student", "mechsub.train.StudentConfig", "run", "runs/student",
    "Fine-tune a student on a data folder (LoRA or full; distillation or SFT), with checkpoints.",
    _report_json,
)  # fmt: skip
_stage_command(
    "eval", "mechsub.evaluate.EvalConfig", "run_eval", "runs/eval",
    "log P of the trait (and every other candidate) after a prefilled answer, over paraphrased questions.",
    _report_json,
)  # fmt: skip


_stage_command(
    "teacher", "mechsub.teachers.TeacherConfig", "run", "runs/teacher",
    "Fine-tune a teacher (LoRA) to love a trait on favourite-thing questions; never on numbers.",
    _report_json,
)  # fmt: skip


_stage_command(
    "divergence", "mechsub.divergence.DivergenceConfig", "run", "runs/divergence",
    "Divergence tokens: where teachers of other traits, given the same prefix, would pick another number token.\n"
    "Writes the share of such tokens and two position masks (OUT/divergent.json, OUT/non_divergent.json) that\n"
    "`mechsub student --set mask=FILE` trains on.",
    _report_json,
)  # fmt: skip
_stage_command(
    "sae", "mechsub.sae.SaeConfig", "train_sae", "runs/sae",
    "Train a sparse autoencoder (sae-lens) on one residual-stream layer, on a corpus built offline; report L0,\n"
    "explained variance, dead fraction and the spliced loss increase. Give its folder to `mechsub analyze\n"
    "--set sae=FOLDER` for feature diffs and the feature list.",
    _report_json,
)  # fmt: skip


def _report_study(m: dict[str, Any], out: Path) -> None:
    e, x = m["effect"], m["trait"]
    typer.echo(f"trait {x}: Δ log P({x}) vs base")
    typer.echo(f"  teacher           {m['teacher']['delta_logp']:+.3f}")
    typer.echo(f"  students of {x:5s} {m['student']['delta_logp']:+.3f}  (seeds {m['seeds']})")
    typer.echo(f"  control students  {m['control']['delta_logp']:+.3f}")
    lo, hi = e["ci95"]
    typer.echo(
        f"  specific effect   {e['delta_logp']:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}], p = {e['p_value']:.2g}"
    )
    if m.get("cross_family"):
        typer.echo(
            f"  cross-family      {m['cross_family']['effect']['delta_logp']:+.3f}  ({m['cross_family']['model']})"
        )
    typer.echo(
        f"wrote {out}/report.md, {out}/report.html, {out}/metrics.json ({m['wall_seconds'] / 60:.1f} min)"
    )


_stage_command(
    "study", "mechsub.study.StudyConfig", "run", "artifacts/demo",
    "The main job: teachers of the trait and its controls, number data, students over seeds, the specificity\n"
    "matrix and a cross-family control. Writes OUT/report.md, OUT/report.html, OUT/metrics.json and plots;\n"
    "stage runs (resumable, shared between studies) go under the config's `work` folder.",
    _report_study,
)  # fmt: skip


@app.command()
def analyze(
    checkpoint: Annotated[str, typer.Argument(help="a student checkpoint folder or a student run folder")],
    out: Annotated[
        Path | None, typer.Option(help="output folder (default runs/analyze/<checkpoint name>)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="delete a previous analysis in OUT and start over")] = False,
) -> None:
    """Steering vectors, patching maps, entangled numbers and attention/token views for one checkpoint.

    Needs --set data=FOLDER (the number data it was trained on); --set controls='["ck1","ck2"]' adds the
    generic/specific split. Writes OUT/metrics.json, steering.png, patching.png, views.html.
    """
    from mechsub.analyze import AnalyzeConfig, run

    try:
        cfg = build_config(AnalyzeConfig, config, [*(set_ or []), f"checkpoint={checkpoint}"])
        folder = out or Path("runs/analyze") / Path(checkpoint).resolve().name
        m = run(cfg, folder, force=force)  # type: ignore[arg-type]
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        _fail(e)
        return
    st, p = m["steering"], m["patching"]
    best = max(range(len(m["layers"])), key=lambda i: st["sufficiency"][i])
    typer.echo(f"trait {m['trait']}: student − base Δ log P {st['student_delta_logp']:+.3f}")
    typer.echo(f"  best sufficiency: layer {m['layers'][best]} {st['sufficiency'][best]:+.3f}; "
               f"cos(v_teacher, v_student) there {st['cos_teacher_student'][best]:+.2f}")  # fmt: skip
    if p.get("fraction_by_layer"):
        typer.echo("  patching fraction by layer: " + " ".join(f"{x:+.2f}" for x in p["fraction_by_layer"]))
    typer.echo(f"wrote {folder}/metrics.json, steering.png, patching.png, views.html")


@app.command()
def models(
    name: Annotated[str, typer.Argument(help="model name or checkpoint folder")] = "smollm2-135m-instruct",
) -> None:
    """Load a model (building its safetensors cache on first use) and print what it is."""
    from mechsub import models as mm

    try:
        lm = mm.load(name)
    except mm.ModelError as e:
        _fail(e)
        return
    typer.echo(json.dumps(lm.info(), indent=2))


def _report_bench(m: dict[str, Any], out: Path) -> None:
    g = m["generation"]
    typer.echo(
        f"generation: mechsub {g['mechsub_new_tok_per_s']:.1f} new tok/s (batch {g['mechsub_batch_size']}) vs "
        f"HF generate {g['hf_generate_new_tok_per_s']:.1f} (batch {g['hf_batch_size']}): {g['ratio']:.2f}x"
    )
    typer.echo(f"wrote {out}/metrics.json")


_stage_command(
    "bench", "mechsub.bench.BenchConfig", "run", "artifacts/bench",
    "Speed benchmarks as ratios measured in one run: mechsub's constrained decoder vs plain HF generate.\n\n"
    "A benchmark always runs anew.",
    _report_bench,
)  # fmt: skip


if __name__ == "__main__":
    app()
