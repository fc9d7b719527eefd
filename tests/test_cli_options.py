"""The CLI's options come from the config dataclasses: the same defaults, one meaning of K/M/G, range checks before
anything loads or is written, messages printed literally, and --help / option errors answered without torch."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from tiny_hf import CLI, attnprobe

HEAVY = ("torch", "transformers", "pandas")


def _commands():
    import typer

    from attnprobe.analyses import cli

    return typer.main.get_command(cli.app).commands


def _config_classes():
    from attnprobe.analyses.conversion.config import ConvertConfig
    from attnprobe.analyses.experiments.config import AblateConfig, BudgetSizes, MatrixSizes
    from attnprobe.probe.config import CensusConfig

    return {"census": CensusConfig, "ablate": AblateConfig, "swap": MatrixSizes, "budget": BudgetSizes, "convert": ConvertConfig}


@pytest.mark.parametrize("command", ["census", "ablate", "swap", "budget", "convert"])
def test_every_cli_default_is_its_dataclass_default(command):
    from attnprobe.analyses.cli_options import field_options

    config_class = _config_classes()[command]
    reference = config_class()  # its defaults, as __post_init__ leaves them
    params = {p.name: p for p in _commands()[command].params}
    options = field_options(config_class)
    assert options and {o.field.name for o in options} <= set(params)
    for option in options:
        parsed = option.value(params[option.field.name].default)  # the text the CLI starts from, read as a user's would be
        assert parsed == getattr(reference, option.field.name), (command, option.field.name, params[option.field.name].default)
        assert params[option.field.name].help == option.field.metadata["help"] or option.field.name.endswith("tokens")


def test_every_field_with_help_is_an_option_and_a_new_one_needs_no_cli_edit():
    import typer
    from typer.testing import CliRunner

    from attnprobe.analyses.cli_options import config_options
    from attnprobe.analyses.conversion.config import ConvertConfig

    for command, config_class in _config_classes().items():
        names = {p.name for p in _commands()[command].params}
        assert {f.name for f in dataclasses.fields(config_class) if "help" in f.metadata and f.metadata.get("cli", True)} <= names
    extended = dataclasses.make_dataclass("Extended", [
        ("dropout", float, dataclasses.field(default=0.0, metadata={"help": "LoRA dropout"})),
        ("layers_kept", tuple[int, ...], dataclasses.field(default=(1, 2), metadata={"help": "kept layers"})),
        ("sample_tokens", int, dataclasses.field(default=1 << 10, metadata={"help": "sampled tokens"}))], bases=(ConvertConfig,))
    app, seen = typer.Typer(), []

    @app.command()
    @config_options(extended)
    def run(config: extended) -> None:
        seen.append(config)

    result = CliRunner().invoke(app, ["--dropout", "0.25", "--layers-kept", "3,4", "--sample-tokens", "2K", "--tokens", "3M"])
    assert result.exit_code == 0, result.output
    assert (seen[0].dropout, seen[0].layers_kept, seen[0].sample_tokens, seen[0].tokens) == (0.25, (3, 4), 2048, 3 << 20)
    assert "--dropout" in CliRunner().invoke(app, ["--help"]).output


@pytest.mark.parametrize("text, count", [("1M", 1 << 20), ("512K", 512 * 1024), ("1.5M", 3 << 19), ("2G", 2 << 30),
                                         ("100000", 100000), ("20m", 20 << 20), ("0", 0)])
def test_token_counts_read_binary_suffixes(text, count):
    from attnprobe.analyses.conversion.config import format_tokens, parse_tokens

    assert parse_tokens(text) == count
    assert parse_tokens(format_tokens(count)) == count


@pytest.mark.parametrize("text", ["lots", "nan", "inf", "-1M", "1.5", "1e400", "0.3K", ""])
def test_unreadable_token_counts_are_refused(text):
    from attnprobe.analyses.conversion.config import parse_tokens
    from attnprobe.errors import AttnprobeError

    with pytest.raises(AttnprobeError, match="cannot read a token count"):
        parse_tokens(text)


def test_the_light_name_lists_match_the_registries():
    from types import SimpleNamespace

    from attnprobe.analyses.experiments.variants import VARIANT_NAMES, catalogue
    from attnprobe.kernels import names, registry
    from attnprobe.probe import declared, mechanisms

    assert names.KINDS == {name: family.kind for name, family in registry.FAMILIES.items()}
    found = declared.declared()
    assert [name for name, _ in found.stages] == [s.name for s in mechanisms.stages()]
    assert dict(found.stages) == {s.name: s.description for s in mechanisms.stages()}
    assert found.thresholds == mechanisms.default_thresholds()
    assert list(found.labels) == [m.label for m in mechanisms.mechanisms()]
    sliding = SimpleNamespace(info=SimpleNamespace(layer_types=["sliding", "full"]))
    assert tuple(catalogue(sliding)) == VARIANT_NAMES


def _imports_of(*args) -> tuple[subprocess.CompletedProcess, set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args], capture_output=True, text=True, timeout=120)
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["census", "--help"], 0), (["convert", "--help"], 0), (["budget", "--help"], 0), (["swap", "--help"], 0),
    (["ablate", "--help"], 0), (["info", "--help"], 0), (["figures", "--help"], 0),
    (["census", "--needles", "abc"], 2), (["census", "--needles", "0"], 2), (["census", "--sink-threshold", "1.5"], 2),
    (["convert", "--tokens", "lots"], 2), (["convert", "--warmup", "1.5"], 2), (["budget", "--budgets", "0"], 2),
    (["swap", "--kernel", "cosine", "--layers", "0"], 2), (["swap", "--matrix", "--variants", "nonsense"], 2),
    (["ablate", "--mode", "nonsense", "--heads", "0.1"], 2), (["census", "--skip", "nonsense"], 2),
])
def test_help_and_option_errors_import_no_torch(args, code):
    result, modules = _imports_of(*args)
    assert result.returncode == code, result.stderr[-2000:]
    assert not modules & set(HEAVY), modules & set(HEAVY)
    if code == 2:
        errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert len(errors) == 1 and errors[0].startswith("error: "), errors


@pytest.mark.parametrize("args, message", [
    (["convert", "--lr", "nan"], "--lr takes a finite number"),
    (["convert", "--tokens", "inf"], "cannot read a token count"),
    (["convert", "--batch", "0"], "--batch must be a whole number of at least 1"),
    (["convert", "--min-lr", "2"], "--min-lr must be a number at least 0 and at most 1"),
    (["convert", "--tokens", "0", "--transfer-tokens", "0"], "not both 0"),
    (["convert", "--train", "everything"], "unknown --train 'everything'"),
    (["convert", "--batch", "6", "--accumulation", "4"], "make --batch a multiple of 4"),
    (["convert", "--variants", "all-nothing"], "unknown variant(s) all-nothing"),
    (["budget", "--budgets", "1.5"], "--budgets are shares of heads in (0, 1]"),
    (["budget", "--seeds", "0"], "--seeds takes whole numbers of at least 1"),
    (["budget", "--kinds", "sink+windows:sinks=4"], "unknown kernel 'sink+windows'"),
    (["budget", "--selectors", "oracle"], "unknown --selectors oracle"),
    (["budget", "--niah-lengths", "8"], "--niah-lengths takes whole numbers of at least 16"),
    (["ablate", "--heads", "0.1", "--seeds", "0"], "--seeds takes whole numbers of at least 1"),
    (["ablate", "--heads", "0.1", "--exclude-top", "-1"], "--exclude-top takes whole numbers of at least 0"),
    (["swap", "--kernel", "elu", "--layers", "0", "--passkey-depths", "1.5"], "--passkey-depths are fractions 0-1"),
    (["census", "--massive-absolute", "inf"], "--massive-absolute takes a finite number"),
    (["census", "--massive-relative", "0"], "must be above 0"),
])
def test_range_checks_run_before_any_model_loads(tmp_path, monkeypatch, capsys, args, message):
    from attnprobe.analyses import cli

    monkeypatch.setattr(cli, "_load", lambda spec: pytest.fail("a model was loaded before the options were checked"))
    monkeypatch.setattr(sys, "argv", ["attnprobe", args[0], "--out", str(tmp_path / "run"), *args[1:]])
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_messages_are_printed_literally(tmp_path, monkeypatch, capsys):
    """No rich markup: an install hint's [qwen] and a path's [bold] reach the user as written."""
    from attnprobe.analyses import cli
    from attnprobe.errors import AttnprobeError
    from attnprobe.hooks.embedded import MODELS

    hint = MODELS["qwen2.5-coder-0.5b"].install
    assert "'.[qwen]'" in hint
    monkeypatch.setattr(cli, "_load", lambda spec: (_ for _ in ()).throw(AttnprobeError(f"not installed: {hint}")))
    monkeypatch.setattr(sys, "argv", ["attnprobe", "info", "--model", "qwen2.5-coder-0.5b"])
    with pytest.raises(SystemExit):
        cli.main()
    assert f"error: not installed: {hint}" in " ".join(capsys.readouterr().err.split())
    odd = tmp_path / "[bold]runs[red]"
    odd.write_text("a file")
    result = attnprobe("census", "--out", odd)
    assert result.returncode == 2 and f"--out {odd} is a file" in result.stderr, result.stderr


def test_summary_lines_keep_brackets(tmp_path, monkeypatch):
    import pandas as pd
    from rich.console import Console

    from attnprobe.analyses import cli

    monkeypatch.setattr(cli, "console", Console(markup=False, highlight=False, record=True, width=300))
    heads = pd.DataFrame({"layer": [0], "head": [0], "induction_score": [0.95]})
    cli.print_summary(tmp_path, heads)
    assert "induction heads 1 of 1 above 0.4: 0.0=0.95" in cli.console.export_text()


def test_global_options_are_checked_without_torch():
    result, modules = _imports_of("--dtype", "float8", "info")
    assert result.returncode == 2 and "unknown --dtype 'float8'" in result.stderr
    assert not modules & set(HEAVY)


def test_float_options_are_finite():
    from attnprobe.analyses.cli_options import field_options
    from attnprobe.analyses.conversion.config import ConvertConfig
    from attnprobe.errors import AttnprobeError

    lr = next(o for o in field_options(ConvertConfig) if o.field.name == "lr")
    assert lr.value(0.5) == 0.5
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(AttnprobeError, match="--lr takes a finite number"):
            lr.value(bad)


def test_adding_lora_adapters_warns_nothing(recwarn):
    """peft reads a deprecated transformers property; the user's terminal must not show it for our call."""
    import warnings

    from tiny_hf import TinyTokenizer, tiny_llama, wrap

    from attnprobe.analyses.conversion.train import adapted

    warnings.simplefilter("always")
    with adapted(wrap(tiny_llama(), TinyTokenizer()), "lora", 4) as params:
        assert params
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))], [str(w.message) for w in recwarn]


def test_convert_evaluates_at_the_sizes_asked_for():
    from attnprobe.analyses.cli import evaluation_sizes
    from attnprobe.analyses.experiments.config import DEFAULT_TASKS, MatrixSizes

    gpu = evaluation_sizes(False, True, "passkey, niah")(census=False)
    assert gpu == MatrixSizes.gpu(tasks=("passkey", "niah"), census=False)
    assert evaluation_sizes(False, False, None)() == MatrixSizes()
    assert evaluation_sizes(True, False, None)().tasks == DEFAULT_TASKS and evaluation_sizes(True, False, None)().allow_small
