"""What a user meets on the command line: a warning for prompts the embedded model cannot draw, and no
third-party notices on every command."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from postdiff.cli import app
from postdiff.generate import embedded_model_warning


def test_a_prompt_outside_the_embedded_models_classes_gets_a_warning_that_lists_them():
    warning = embedded_model_warning("a photo of a cat", None)
    assert "only its 10 Fashion-MNIST classes" in warning and "sneaker" in warning and "ankle boot" in warning
    assert embedded_model_warning("a photo of a sneaker", None) is None
    assert embedded_model_warning("Two ANKLE BOOTS", None) is None  # synonyms, any case
    assert embedded_model_warning("a photo of a cat", "some-org/a-diffusers-model") is None  # not the embedded model


def test_generate_warns_before_generating(tmp_path):
    result = CliRunner().invoke(app, ["generate", "a photo of a cat", "--num-images", "1", "--steps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert output.index("names none of them") < output.index("postdiff config:")
    sneaker = CliRunner().invoke(app, ["generate", "a photo of a sneaker", "--num-images", "1", "--steps", "2", "--out", str(tmp_path)])
    assert sneaker.exit_code == 0 and "warning" not in sneaker.stdout


def test_the_command_line_prints_no_transformers_notices():
    environment = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run([sys.executable, "-m", "postdiff.cli", "plan", "--model", "testbed", "--steps", "2"],
                            env=dict(environment, HF_HUB_OFFLINE="1"), capture_output=True, text=True, check=True)
    assert "PostDiff plan" in result.stdout
    assert "[transformers]" not in result.stdout + result.stderr
