"""The README's commands and code run as printed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def code_block_after(heading: str, language: str) -> str:
    section = README[README.index(heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block after {heading!r}"
    return match.group(1)


def test_own_training_loop_snippet_runs(capsys):
    snippet = code_block_after("## Using the optimizer in your own training loop", "python")
    exec(compile(snippet, "README.md", "exec"), {})

    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 5
    assert losses[-1] < losses[0]


def test_setup_commands_are_make_targets():
    makefile = (REPO_ROOT / "Makefile").read_text()
    setup = code_block_after("## Set-up", "bash")
    assert "make setup" in setup
    assert "make test" in setup
    assert re.search(r"^setup:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)
    assert "+model=tiny +optim=mars_m +experiment=quickstart" in setup


@pytest.mark.slow
def test_gpt2_small_two_steps_on_cpu(tmp_path, corpus_cache):
    block = code_block_after("To check the", "bash")
    args = block.replace("\\\n", " ").split()
    assert args[:3] == ["python", "-m", "mars_m_exp"]

    result = subprocess.run(
        [sys.executable, *args[1:], f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "model gpt2_small: 123.59M parameters" in output
    assert "step 2/2" in output


def test_readme_shows_torchrun_for_a_gpu_node():
    block = code_block_after("## Several GPUs: DDP with torchrun", "bash")
    assert block.startswith("torchrun --standalone --nproc_per_node=8 -m mars_m_exp +model=gpt2_small +optim=mars_m hardware=gpu")
