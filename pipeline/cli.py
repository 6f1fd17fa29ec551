"""The ``cocomix`` command line.

Every command is a config dataclass (fields = flags, see :mod:`cocomix.core.configs`)
plus a run function imported lazily, so ``--help`` stays fast.
"""
from __future__ import annotations

import typer

from cocomix.core.configs import add_command
from cocomix.core.logs import setup_logging
from cocomix.pipeline import __version__
from cocomix.pipeline.quickstart import QuickstartConfig
from cocomix.pipeline.study import StudyConfig
from cocomix.stage1_extract.config import ExtractConfig, SaeTrainConfig
from cocomix.stage2_pretrain.concepts_config import DescribeConfig, ShowConfig, WeightsConfig
from cocomix.stage2_pretrain.config import CompareConfig, EvalConfig, PretrainConfig
from cocomix.stage2_pretrain.generate_config import GenerateConfig, SteerConfig
from cocomix.storage.config import InspectConfig, TokenizeConfig, VerifyConfig

app = typer.Typer(
    name="cocomix",
    help="CoCoMix pretraining in two stages: `extract` concept targets once, `pretrain` many students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
sae_app = typer.Typer(help="Sparse autoencoders for teachers without a published one.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")
concepts_app = typer.Typer(help="Read the concepts of a CoCoMix student: a concept dictionary, per-token predictions, W_comp norms.", no_args_is_help=True)
app.add_typer(concepts_app, name="concepts")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cocomix {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    setup_logging(verbose)


COMMANDS = {
    "tokenize": (app, TokenizeConfig, "cocomix.storage.tokenize:run_tokenize"),
    "inspect": (app, InspectConfig, "cocomix.storage.inspect:run_inspect"),
    "verify": (app, VerifyConfig, "cocomix.storage.verify:run_verify"),
    "extract": (app, ExtractConfig, "cocomix.pipeline.chain:run_extract_chain"),
    "sae train": (sae_app, SaeTrainConfig, "cocomix.stage1_extract.sae.train:run_sae_train"),
    "pretrain": (app, PretrainConfig, "cocomix.stage2_pretrain.train:run_pretrain"),
    "eval": (app, EvalConfig, "cocomix.stage2_pretrain.evaluate:run_eval"),
    "compare": (app, CompareConfig, "cocomix.stage2_pretrain.compare:run_compare"),
    "generate": (app, GenerateConfig, "cocomix.stage2_pretrain.generate:run_generate"),
    "steer": (app, SteerConfig, "cocomix.pipeline.steer:run_steer"),
    "quickstart": (app, QuickstartConfig, "cocomix.pipeline.quickstart:run_quickstart"),
    "study": (app, StudyConfig, "cocomix.pipeline.study:run_study"),
    "concepts describe": (concepts_app, DescribeConfig, "cocomix.stage2_pretrain.concepts_describe:run_describe"),
    "concepts show": (concepts_app, ShowConfig, "cocomix.stage2_pretrain.concepts_show:run_show"),
    "concepts weights": (concepts_app, WeightsConfig, "cocomix.stage2_pretrain.concepts_weights:run_weights"),
}

for _name, (_app, _cfg, _run) in COMMANDS.items():
    add_command(_app, _name.split()[-1], _cfg, _run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
