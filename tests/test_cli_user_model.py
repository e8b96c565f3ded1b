"""`exactlr lr` on the user's own code: --model/--data specs, --k-hat, --check, --plot."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from exactlr.cli import main
from exactlr.stepsize import suggest_lr

SPEC = ["--model", "tests_pkg.module:factory", "--data", "tests_pkg.module:loader"]


def _status(argv: list[str]) -> int:
    """The exit status of `exactlr ARGV`, whether argparse or the command reports it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["lr", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_and_data_specs_give_the_library_result(capsys: pytest.CaptureFixture[str]) -> None:
    from tests_pkg.module import factory, loader

    out = _run_json(capsys, *SPEC, "--samples", "3", "--epochs", "4", "--seed", "5")
    assert out["batches_per_epoch"] == 2 and out["total_steps"] == 8
    assert out["model"] == "tests_pkg.module:factory" and out["dataset"] == SPEC[3]
    # The same numbers as the library with the factory as make_model and the model the
    # factory draws under the seed.
    torch.manual_seed(5)
    model = factory()
    s = suggest_lr(
        model,
        F.cross_entropy,
        loader(),
        total_steps=8,
        make_model=factory,
        num_samples=3,
        generator=torch.Generator().manual_seed(5),
    )
    assert out["initial_loss"] == pytest.approx(s.initial_loss, rel=1e-12)
    assert out["k_hat"] == pytest.approx(s.k_hat, rel=1e-9)
    assert out["lr"] == pytest.approx(s.lr, rel=1e-9)
    assert out["check"] is None and out["warning"] is None


def test_file_path_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "my_model.py"
    source.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                return nn.Linear(8, 3)

            def batches():
                g = torch.Generator().manual_seed(1)
                return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
            """
        )
    )
    out = _run_json(
        capsys, "--model", f"{source}:build", "--data", f"{source}:batches", "--samples", "2"
    )
    assert out["batches_per_epoch"] == 1 and out["total_steps"] == 100
    assert out["lr"] == pytest.approx(
        math.sqrt(2 * out["initial_loss"] / (out["k_hat"] * 100)), rel=1e-12
    )


def test_user_model_on_a_builtin_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    source = "tests_pkg.module:mnist_shaped"
    out = _run_json(capsys, "--model", source, "--samples", "2", "--epochs", "3")
    assert out["dataset"] == "synthetic" and out["num_train"] == 2000
    assert out["total_steps"] == 3


def test_k_hat_reuses_a_measured_value_for_another_t(capsys: pytest.CaptureFixture[str]) -> None:
    measured = _run_json(capsys, *SPEC, "--samples", "2", "--epochs", "4")
    reused = _run_json(capsys, *SPEC, "--k-hat", str(measured["k_hat"]), "--epochs", "16")
    assert reused["k_hat_given"] and reused["samples"] == []
    assert reused["initial_loss"] == measured["initial_loss"]
    assert reused["total_steps"] == 32
    # lr ~ T^(-1/2): four times the steps, half the step size.
    assert reused["lr"] == pytest.approx(measured["lr"] / 2, rel=1e-12)


def test_check_is_reported_in_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_json(capsys, *SPEC, "--samples", "2", "--epochs", "4", "--check", "3")
    check = out["check"]
    assert check["steps"] == 3 and len(check["step_losses"]) == 3
    assert check["lr"] == out["lr"] and check["k_hat"] == out["k_hat"]
    assert check["loss_change"] == pytest.approx(check["final_loss"] - check["initial_loss"])
    assert check["stability_threshold"] == pytest.approx(2 / out["lr"])
    assert check["passed"] == (out["warning"] is None)
    assert main(["lr", *SPEC, "--samples", "2", "--epochs", "4", "--check", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "check: 3 Adam steps at lr=" in text and "vs K_hat" in text
    # A K_hat far below the truth gives a large lr, which the check flags.
    assert main(["lr", *SPEC, "--k-hat", "0.001", "--epochs", "3", "--check", "5"]) == 0
    text = capsys.readouterr().out
    assert "warning: after 5 Adam steps" in text


def test_plot_writes_the_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "samples.png"
    assert main(["lr", *SPEC, "--samples", "3", "--plot", str(path), "--quiet"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot   : {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tests_pkg.nowhere:factory"], "no module named 'tests_pkg.nowhere'"),
        (["--model", "tests_pkg.module:missing"], "has no attribute 'missing'"),
        (["--model", "tests_pkg.module:NOT_CALLABLE"], "is a int, not a callable"),
        (["--model", "tests_pkg.module:not_a_model"], "returned a list, not a torch.nn.Module"),
        (["--model", "tests_pkg.module:"], "is not of the form 'pkg.module:attribute'"),
        (["--model", "nowhere/file.py:build"], "no file 'nowhere/file.py'"),
        (["--data", "tests_pkg.module:nothing"], "has no attribute 'nothing'"),
        (["--model", "tests_pkg.module:factory"], "cannot compute the cross-entropy"),
        ([*SPEC, "--dataset", "mnist"], "--data gives the batches; drop --dataset"),
        ([*SPEC, "--batch-size", "8"], "drop --batch-size"),
        (["--model", "tests_pkg.module:factory", "--init", "paper"], "--init applies to built-in"),
        ([*SPEC, "--k-hat", "0"], "argument --k-hat: expected a positive number, got '0'"),
        ([*SPEC, "--k-hat", "nan"], "argument --k-hat: expected a positive number"),
        ([*SPEC, "--check", "-1"], "argument --check: expected an integer >= 0"),
        ([*SPEC, "--k-hat", "2", "--plot", "x.png"], "with --k-hat there are none to draw"),
        ([*SPEC, "--plot", "samples.txt"], "name a .png, .pdf or .svg file"),
        ([*SPEC, "--plot", "no/such/dir/x.png"], "not a file in an existing folder"),
    ],
)
def test_bad_specs_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _status(["lr", *argv, "--samples", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


def test_a_module_that_fails_to_import_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('no GPU here')\ndef build(): pass\n")
    assert main(["lr", "--model", f"{broken}:build", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: no GPU here" in err
