"""The ``mechsub`` command line. Each command takes a config file and/or ``--set key=value`` overrides."""

from __future__ import annotations

import json
import logging
import os
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


@app.command()
def mnist(
    out: Annotated[
        Path, typer.Option(help="run folder to write (resumed if it holds the same config)")
    ] = Path("artifacts/mnist"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    show_config: Annotated[bool, typer.Option(help="print the resolved config as TOML and exit")] = False,
    force: Annotated[bool, typer.Option(help="delete a previous run in OUT and start over")] = False,
) -> None:
    """The MNIST auxiliary-logit toy: a student that shares the teacher's init learns digits from noise.

    Writes OUT/config.json, OUT/metrics.json and OUT/mnist.png. Fields (settable with --set):
    n_models, m, m_sweep, hidden, teacher_epochs, distill_steps, batch_size, lr, test_fraction, seed.
    """
    from mechsub import mnist as toy

    try:
        cfg = build_config(toy.MnistConfig, config, set_)
    except ConfigError as e:
        _fail(e)
        return
    if show_config:
        typer.echo(cfg.to_toml())
        return
    try:
        m = toy.run(cfg, out, force=force)  # type: ignore[arg-type]
    except Exception as e:  # surfaced with its message, not a traceback wall
        if isinstance(e, ConfigError | RuntimeError):
            _fail(e)
        raise
    rows = ["reference", "teacher", "student_aux", "student_all", "cross_init_aux", "cross_init_all"]
    typer.echo(f"MNIST toy (8x8 digits), m={m['m']}, {m['n_models']} models; held-out accuracy, 95% CI:")
    for r in rows:
        lo, hi = m[f"{r}_acc_ci95"]
        typer.echo(f"  {r:16s} {m[f'{r}_acc'] * 100:5.1f}%  [{lo * 100:5.1f}, {hi * 100:5.1f}]")
    typer.echo(f"wrote {out}/metrics.json and {out}/mnist.png")


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


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="folder for the benchmark's metrics.json")] = Path(
        "artifacts/bench"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Speed benchmarks as ratios measured in one run: mechsub's constrained decoder vs plain HF generate."""
    from mechsub import bench as b

    try:
        cfg = build_config(b.BenchConfig, config, set_)
        m = b.run(cfg, out)  # type: ignore[arg-type]
    except ConfigError as e:
        _fail(e)
        return
    g = m["generation"]
    typer.echo(
        f"generation: mechsub {g['mechsub_new_tok_per_s']:.1f} new tok/s (batch {g['mechsub_batch_size']}) vs "
        f"HF generate {g['hf_generate_new_tok_per_s']:.1f} (batch {g['hf_batch_size']}): {g['ratio']:.2f}x"
    )
    typer.echo(f"wrote {out}/metrics.json")


if __name__ == "__main__":
    app()
