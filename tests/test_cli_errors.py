"""Bad input at every entry point: the library raises ValueError / FileNotFoundError
naming the value; the CLI exits 2 with one line on stderr and no traceback."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exactlr.cli import main
from exactlr.data import (
    ArrayDataset,
    load_dataset,
    load_mnist,
    make_batches,
    synthetic_classification,
)
from exactlr.models import build_model
from exactlr.paper.experiments import resolve_figure, run_figure
from exactlr.paper.results import load_result
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import TrainConfig, train_run, validate_config
from exactlr.stepsize import suggest_lr

REPO = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """Data folders: truncated, corrupted, incomplete, bad labels; a file; an empty dir."""
    root = tmp_path_factory.mktemp("bad")
    source = shared_data / "MNIST" / "raw"
    out: dict[str, Path] = {}
    for kind in ("truncated", "corrupted", "incomplete"):
        raw = root / kind / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in source.iterdir():
            shutil.copyfile(f, raw / f.name)
        images = next(raw.glob("train-images*"))
        if kind == "truncated":
            os.truncate(images, images.stat().st_size // 2)
        elif kind == "corrupted":  # same size, garbage in the middle of the stream
            data = bytearray(images.read_bytes())
            mid = len(data) // 2
            data[mid : mid + 4096] = bytes(4096)
            images.write_bytes(bytes(data))
        else:
            next(raw.glob("train-labels*")).unlink()
        out[kind] = root / kind
    raw = root / "badlabels" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        labels = np.arange(n, dtype=np.uint8) % 10
        labels[3] = 12  # outside [0, 10)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    out["badlabels"] = root / "badlabels"
    out["missing"] = root / "missing"
    out["empty"] = root / "empty"
    out["empty"].mkdir()
    out["file"] = root / "a_file"
    out["file"].write_text("x")
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An out dir with fig1 run at smoke scale (synthetic data, 2 epochs)."""
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.delenv("EXACTLR_DATA", raising=False)
    mp.chdir(out)
    assert main(["run", "fig1", "--scale", "smoke", "--out", str(out), "--epochs", "2",
                 "--quiet"]) == 0  # fmt: skip
    mp.undo()
    torch.set_num_threads(threads)
    return out


def _fill(argv: list[str], dirs: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in dirs.items()}) for a in argv]


# ------------------------------------------------------------------------------- CLI

CLI_CASES: list[tuple[str, str]] = [
    # lr
    ("lr --model bogus --quiet", "unknown model name='bogus'"),
    ("lr --dataset bogus --quiet", "unknown dataset name='bogus'"),
    ("lr --subset tiny", "argument --subset: invalid choice: 'tiny'"),
    ("lr --epochs 0", "argument --epochs: expected a positive integer, got 0"),
    ("lr --epochs -3", "got -3"),
    ("lr --batch-size 0", "argument --batch-size"),
    ("lr --samples 0", "argument --samples"),
    ("lr --model fc1x8 --batch-size 100000 --quiet", "batch_size=100000 is larger"),
    ("lr --device bogus", "--device 'bogus'"),
    (
        "lr --subsample 1.5",
        "argument --subsample: expected 'auto', 'none' or a share strictly between 0 and 1",
    ),
    ("lr --subsample 0.1 --method power", "--subsample 0.1 needs --method lanczos"),
    ("lr --screen 0", "argument --screen: expected 'none' or a number in (0, 1], got '0'"),
    ("lr --dataset mnist --data-dir {truncated} --quiet", "corrupted or truncated"),
    ("lr --dataset mnist --data-dir {corrupted} --quiet", "corrupted or truncated"),
    ("lr --dataset mnist --data-dir {incomplete} --quiet", "MNIST not found"),
    ("lr --dataset mnist --data-dir {missing} --quiet", "does not exist"),
    ("lr --dataset mnist --subset full --data-dir {badlabels} --quiet", "label 12 at index 3"),
    # run
    ("run fig99 --scale smoke", "unknown figure 'fig99'; valid figures: fig1"),
    ("run fig1 --scale huge", "unknown scale 'huge'; valid scales: smoke, cpu, paper"),
    ("run fig1 --scale smoke --epochs 0", "argument --epochs"),
    ("run fig1 --checkpoint-every -1", "argument --checkpoint-every"),
    ("run fig1 --scale smoke --out {file}", "is an existing file"),
    ("run fig1 --scale smoke --out {file}/sub", "which is a file"),
    ("run fig1 --scale smoke --data-dir {truncated} --out {empty}/o1 --quiet", "truncated"),
    ("run fig1 --scale cpu --data-dir {missing} --out {empty}/o2 --quiet", "does not exist"),
    ("run fig1 --scale smoke --data-dir {badlabels} --out {empty}/o3 --quiet", "label 12"),
    ("run", "the following arguments are required: figure"),
    # plot / report
    ("plot fig42", "unknown figure 'fig42'"),
    ("plot fig1 --scale huge", "unknown scale 'huge'"),
    ("plot fig1 --scale smoke --out {empty}", "no results of fig1 at scale smoke"),
    ("plot fig1 --scale smoke --out {missing}", "exactlr run fig1 --scale smoke"),
    ("plot fig1 --out {file}", "is an existing file"),
    ("report fig42", "unknown figure 'fig42'"),
    ("report fig1 --scale smoke --out {empty}", "no results of fig1 at scale smoke"),
    ("report fig1 --out {file}", "is an existing file"),
    ("report fig1 --scale smoke --format xml", "argument --format: invalid choice"),
    # demo / list / top level
    ("demo --out {file}", "is an existing file"),
    ("demo --out {file}/sub", "which is a file"),
    ("demo --epochs 0", "argument --epochs"),
    ("demo --device bogus --out {empty}/d", "--device 'bogus'"),
    ("list extra", "unrecognized arguments: extra"),
    ("", "the following arguments are required: COMMAND"),
    ("bogus", "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("argv", "needle"), CLI_CASES, ids=[c[0] or "none" for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(
    argv: str, needle: str, dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = _fill(argv.split(), dirs)
    try:
        status = main(args)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("exactlr") and "error: " in err and "Traceback" not in err
    assert needle in err, err


def test_cli_bad_allocator_switch_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXACTLR_KEEP_FREED_MEMORY", "maybe")
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "EXACTLR_KEEP_FREED_MEMORY='maybe'" in err, err


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(schema_version=99), "schema_version=99"),
        (lambda d: d.pop("metrics"), "missing field 'metrics'"),
        (lambda d: d["metrics"]["train_loss"].pop(), "unequal lengths"),
    ],
)
def test_report_and_plot_on_hand_edited_result(
    edit: Any, needle: str, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    path = sorted((out / "runs").glob("*__ours__*.json"))[0]
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    for command in ("report", "plot"):
        assert main([command, "fig1", "--scale", "smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and path.name in err, err
    # A truncated file (e.g. copied while it was written by an old version).
    path.write_text(path.read_text()[:100] if path.exists() else "{")
    assert main(["report", "fig1", "--scale", "smoke", "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_report_with_manifest_but_no_results(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "runs")
    assert main(["plot", "fig1", "--scale", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished runs of fig1" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ("run fig99 --scale smoke", "unknown figure 'fig99'"),
        ("run fig1 --scale smoke --out {file}/sub", "which is a file"),
        ("lr --dataset mnist --data-dir {truncated} --quiet", "corrupted or truncated"),
        ("report fig1 --scale smoke --out {empty}", "no results of fig1"),
        ("lr --epochs 0", "argument --epochs"),
    ],
)
def test_cli_subprocess_no_traceback(argv: str, needle: str, dirs: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "exactlr.cli", *_fill(argv.split(), dirs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


# ------------------------------------------------------------------------------- library


@pytest.fixture(scope="module")
def tiny() -> tuple[ArrayDataset, ArrayDataset]:
    return synthetic_classification(num_train=64, num_test=16, seed=0)


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        dataset="synthetic",
        subset="mini",
        model="fc1x8",
        method=MethodSpec("c", "constant", 0.01),
        epochs=2,
        batch_size=None,
    )
    return TrainConfig(**{**base, **kw})


def _model() -> torch.nn.Module:
    return build_model("fc1x8", dataset="synthetic", generator=torch.Generator().manual_seed(0))


def test_library_data_errors(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="name='bogus'"):
        load_dataset("bogus")
    with pytest.raises(ValueError, match="subset='tiny'"):
        load_dataset("mnist", subset="tiny", data_dir=dirs["missing"])
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_dataset("mnist", data_dir=dirs["missing"])
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_dataset("mnist", data_dir=dirs["incomplete"])
    for kind in ("truncated", "corrupted"):
        with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*corrupted or truncated"):
            load_mnist(dirs[kind])
    with pytest.raises(ValueError, match="label 12 at index 3"):
        load_dataset("mnist", data_dir=dirs["badlabels"])


def test_library_model_batch_config_figure_errors(tiny: Any, dirs: dict[str, Path]) -> None:
    train, _ = tiny
    with pytest.raises(ValueError, match="'bogus'"):
        build_model("bogus")
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        build_model("fc1x8", dataset="imagenet")
    with pytest.raises(ValueError, match="batch_size=0"):
        make_batches(train, 0)
    with pytest.raises(ValueError, match="batch_size=65 is larger"):
        make_batches(train, 65)
    for change, match in (
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": -1}, "epochs=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_train": 0}, "num_train=0"),
        ({"subset": "tiny"}, "subset='tiny'"),
    ):
        with pytest.raises(ValueError, match=match):
            validate_config(_cfg(**change))
    with pytest.raises(ValueError, match="unknown figure 'fig99'"):
        resolve_figure("fig99", "smoke")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        resolve_figure("fig1", "huge")
    with pytest.raises(ValueError, match="existing file"):
        run_figure("fig1", scale="smoke", out_dir=dirs["file"], progress=False)
    with pytest.raises(ValueError, match="cannot be created"):
        run_figure("fig1", scale="smoke", out_dir=dirs["file"] / "sub", progress=False)
    with pytest.raises(ValueError, match="checkpoint_every=-2"):
        run_figure("fig1", scale="smoke", out_dir=dirs["empty"], checkpoint_every=-2)
    with pytest.raises(FileNotFoundError):
        load_result(dirs["missing"] / "r.json")


def test_library_training_data_errors(tiny: Any) -> None:
    train, test = tiny
    with pytest.raises(ValueError, match="batch_size=100 is larger"):
        train_run(_cfg(batch_size=100), _model(), train, test)
    bad_labels = ArrayDataset(train.inputs, train.targets.clone(), 10, "bad-labels")
    bad_labels.targets[5] = 10
    with pytest.raises(ValueError, match=r"'bad-labels'.*label 10 at index 5"):
        train_run(_cfg(), _model(), bad_labels, test)
    nan_inputs = ArrayDataset(train.inputs.clone(), train.targets, 10, "nan-inputs")
    nan_inputs.inputs[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'nan-inputs' has NaN or inf inputs.*sample 7"):
        train_run(_cfg(), _model(), nan_inputs, test)
    with pytest.raises(ValueError, match="'nan-inputs'"):
        train_run(_cfg(), _model(), train, nan_inputs)  # the test set too


def test_suggest_lr_errors(tiny: Any) -> None:
    train, _ = tiny
    batches = make_batches(train, None)
    with pytest.raises(ValueError, match="total_steps=0"):
        suggest_lr(_model(), F.cross_entropy, batches, total_steps=0)
    with pytest.raises(ValueError, match="num_samples"):
        suggest_lr(_model(), F.cross_entropy, batches, total_steps=10, num_samples=0)
    with pytest.raises(ValueError):
        suggest_lr(_model(), F.cross_entropy, [], total_steps=10)
    x = train.inputs.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"(?i)nan|finite"):
        suggest_lr(_model(), F.cross_entropy, [(x, train.targets)], total_steps=10, num_samples=1)
    y = train.targets.clone()
    y[2] = 11
    with pytest.raises(ValueError, match="11"):
        suggest_lr(_model(), F.cross_entropy, [(train.inputs, y)], total_steps=10, num_samples=1)


def test_corrupted_fixture_is_a_bad_gzip_stream(dirs: dict[str, Path]) -> None:
    # The corrupted file really is a gzip stream of the right size (so the check is the
    # reader's, not a missing file's).
    images = next((dirs["corrupted"] / "MNIST" / "raw").glob("train-images*"))
    assert images.stat().st_size > 1_000_000
    with pytest.raises((OSError, EOFError, ValueError)), gzip.open(images) as f:
        f.read()
