"""The README's Python snippet runs (on a tiny model in place of the default one), and every `attnprobe`
command it shows names a real command and real options (checked against that command's --help)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from attnprobe.analyses.cli import app
from tiny_hf import tiny_model_dir
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    found = re.search(r"<!-- snippet:api -->\n```python\n(.*?)```\n<!-- /snippet:api -->", README.read_text(), re.S)
    assert found, "README.md has no Python snippet between <!-- snippet:api --> markers"
    return found.group(1)


def test_the_python_snippet_runs(tmp_path, monkeypatch, capsys):
    tiny = tiny_model_dir(tmp_path / "model", max_positions=4096)  # the census's default NIAH lengths fit
    code = snippet()
    assert '"smollm2-135m"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"smollm2-135m"', repr(str(tiny))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "induction_score" in printed and "largest logit change:" in printed
    assert (tmp_path / "runs" / "api" / "heads.parquet").is_file()
    assert float(printed.rsplit(":", 1)[1]) > 0  # the replaced heads moved the logits


def commands() -> list[list[str]]:
    """Each `attnprobe ...` invocation in the README's bash blocks, as argument lists after the program name."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0].endswith("attnprobe"):
                    found.append(words[1:])
    return found


GLOBAL_WITH_VALUE = {"--dtype", "--device", "--device-map"}


def split_global(words: list[str]) -> tuple[list[str], str, list[str]]:
    """(global options, command, the command's words)."""
    index = 0
    while words[index].startswith("--"):
        index += 2 if words[index] in GLOBAL_WITH_VALUE else 1
    return words[:index], words[index], words[index + 1:]


def help_text(*words: str):
    return CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "200"})


def options(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][\w-]*)", text))


def test_the_readme_shows_commands():
    shown = {split_global(words)[1] for words in commands()}
    assert {"info", "census", "figures", "ablate", "swap", "convert", "budget"} <= shown


def test_every_readme_command_and_option_exists():
    listing = help_text()
    assert listing.exit_code == 0, listing.output
    helps: dict[str, set[str]] = {}
    problems = []
    for words in commands():
        global_words, command, rest = split_global(words)
        if command not in helps:
            result = help_text(command)
            if result.exit_code != 0:
                problems.append(f"attnprobe {command}: no such command")
                continue
            helps[command] = options(result.output)
        problems += [f"attnprobe {w}: no such global option" for w in global_words if w.startswith("--") and w not in options(listing.output)]
        problems += [f"attnprobe {command} {w}" for w in rest if w.startswith("--") and w.split("=")[0] not in helps[command]]
    assert not problems, "README options missing from --help: " + "; ".join(problems)


def test_the_option_check_reads_real_options():
    census = options(help_text("census").output)
    assert "--out" in census and "--lengths" in census and "--nonsense" not in census
    assert help_text("nonsense").exit_code != 0
