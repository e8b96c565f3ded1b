"""Results you can trust: each result and cache entry is tied to what made it, caches are
validated, files are strict JSON confined to the results folder, bad input is one line."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exactlr import exact_step_size, hessian_spectral_norm
from exactlr.cli import main
from exactlr.curvature import SpectralOptions
from exactlr.data import load_cifar10
from exactlr.paper.report import figure_report
from exactlr.paper.results import load_result, load_results
from exactlr.paper.runner import run_figure
from exactlr.paper.store import confined_path, read_json, write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], text: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("exactlr") and "error:" in err, err
    assert text in err, err


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fig1 at smoke scale on the synthetic set (no data folder), 2 epochs."""
    mp = pytest.MonkeyPatch()
    mp.delenv("EXACTLR_DATA", raising=False)
    mp.chdir(tmp_path_factory.mktemp("cwd"))
    out = tmp_path_factory.mktemp("smoke")
    run_figure("fig1", scale="smoke", out_dir=out, progress=False, epochs=2, num_threads=1)
    mp.undo()
    return out


def _copy(src: Path, dst: Path) -> Path:
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def _rerun(out: Path) -> list[Path]:
    return run_figure("fig1", scale="smoke", out_dir=out, progress=False, epochs=2, num_threads=1)


# ------------------------------------------------------------------ provenance, matching


def test_every_result_and_cache_entry_records_what_made_it(smoke: Path) -> None:
    results = load_results(smoke)
    assert len(results) == 8
    for result in results:
        prov = result["provenance"]
        data = prov["data"]
        assert data["dataset"] == "synthetic" and data["synthetic_fallback"] is True
        assert len(data["train_sha256"]) == len(data["test_sha256"]) == 64
        assert prov["w0_sha256"] == result["extra"]["w0_sha256"]
        assert prov["code"]["exactlr"]
        assert result["total_steps"] == 2
    (entry_path,) = (smoke / "lr").glob("*.json")
    entry = read_json(entry_path)
    assert entry["provenance"]["data"] == results[0]["provenance"]["data"]
    assert entry["setting"]["epochs"] == 2


@pytest.mark.parametrize(
    "tamper",
    ["cosine_as_ours", "edited_lr", "short_metrics", "nan_literal", "other_w0", "truncated"],
)
def test_a_result_that_does_not_match_its_plan_is_set_aside_and_rerun(
    smoke: Path, tmp_path: Path, tamper: str, no_data: None
) -> None:
    out = _copy(smoke, tmp_path / "out")
    runs = out / "runs"
    ours = next(runs.glob("*__ours__*"))
    cosine = next(runs.glob("*__cosine__*"))
    record = json.loads(ours.read_text())
    if tamper == "cosine_as_ours":
        ours.write_bytes(cosine.read_bytes())
    elif tamper == "edited_lr":
        record["config"]["method"]["lr"] = 1000.0
        ours.write_text(json.dumps(record))
    elif tamper == "short_metrics":
        record["metrics"] = {k: v[:2] for k, v in record["metrics"].items()}
        ours.write_text(json.dumps(record))
    elif tamper == "nan_literal":
        ours.write_text(ours.read_text().replace('"seconds": ', '"seconds": NaN, "x": ', 1))
    elif tamper == "other_w0":
        record["provenance"]["w0_sha256"] = "0" * 64
        ours.write_text(json.dumps(record))
    else:
        ours.write_text(ours.read_text()[:100])
    tampered = ours.read_bytes()
    if tamper != "other_w0":  # the report refuses it too, naming the file
        with pytest.raises(ValueError, match=ours.name):
            figure_report("fig1", out_dir=out, scale="smoke")
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json") if p != ours}
    _rerun(out)
    (aside,) = (out / "aside" / "runs").iterdir()
    assert aside.name == ours.name + ".1" and aside.read_bytes() == tampered
    fresh, reference = load_result(ours)["metrics"], load_result(smoke / "runs" / ours.name)
    fresh.pop("seconds")
    reference["metrics"].pop("seconds")
    assert fresh == reference["metrics"]
    # The other runs matched their plans and were kept as they were.
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json") if p != ours} == before


def test_results_from_other_data_are_recomputed(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same figure with pixel-inverted MNIST in another folder: same run names, other
    data. Nothing of the first data set is reused."""
    inverted = tmp_path / "inverted" / "MNIST" / "raw"
    inverted.mkdir(parents=True)
    for path in (shared_data / "MNIST" / "raw").glob("*.gz"):
        data = bytearray(gzip.decompress(path.read_bytes()))
        if "images" in path.name:  # 16-byte IDX header, then the pixels
            pixels = np.frombuffer(bytes(data[16:]), np.uint8)
            data[16:] = (255 - pixels).astype(np.uint8).tobytes()
        (inverted / path.name.removesuffix(".gz")).write_bytes(bytes(data))
    out = tmp_path / "out"
    kwargs = dict(scale="smoke", out_dir=out, progress=False, epochs=1, num_threads=1)
    first = run_figure("fig1", data_dir=shared_data, **kwargs)
    before = {p.name: load_result(p)["metrics"]["train_loss"] for p in first}
    second = run_figure("fig1", data_dir=tmp_path / "inverted", **kwargs)
    assert [p.name for p in second] == [p.name for p in first]
    aside = sorted(p.name for p in (out / "aside" / "runs").iterdir())
    assert aside == sorted(p.name + ".1" for p in first)
    assert len(list((out / "aside" / "lr").iterdir())) == 1  # K_hat recomputed too
    for path in second:
        assert load_result(path)["metrics"]["train_loss"] != before[path.name]


# ------------------------------------------------------------------ the LR cache


@pytest.mark.parametrize("tamper", ["truncated", "empty_object", "edited_lr", "foreign"])
def test_a_bad_lr_cache_entry_is_named_and_recomputed(
    smoke: Path,
    tmp_path: Path,
    tamper: str,
    no_data: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = _copy(smoke, tmp_path / "out")
    (entry_path,) = (out / "lr").glob("*.json")
    entry = json.loads(entry_path.read_text())
    if tamper == "truncated":
        entry_path.write_text(entry_path.read_text()[:50])
    elif tamper == "empty_object":
        entry_path.write_text("{}")
    elif tamper == "edited_lr":
        entry["lr"] = 1000.0
        entry_path.write_text(json.dumps(entry))
    else:  # another data set's entry under this name
        entry["provenance"]["data"]["train_sha256"] = "f" * 64
        entry_path.write_text(json.dumps(entry))
    tampered = entry_path.read_bytes()
    for result in (out / "runs").glob("*.json"):
        result.unlink()  # so that the runs need the entry
    with caplog.at_level("WARNING", logger="exactlr"):
        _rerun(out)
    assert any(entry_path.name in r.getMessage() for r in caplog.records)
    (aside,) = (out / "aside" / "lr").iterdir()
    assert aside.read_bytes() == tampered
    assert read_json(entry_path)["lr"] == read_json(smoke / "lr" / entry_path.name)["lr"]


def test_stray_files_in_the_lr_cache_are_ignored(smoke: Path, tmp_path: Path, no_data) -> None:
    out = _copy(smoke, tmp_path / "out")
    (out / "lr" / "notes.json").write_text("{}")
    (out / "lr" / "broken.json").write_text("{")
    # Another horizon: a new setting, which may reuse the K_hat estimate but not the strays.
    run_figure("fig1", scale="smoke", out_dir=out, progress=False, epochs=3, num_threads=1)
    new = read_json(next((out / "lr").glob("*__e3__*")))
    assert new["reused_from"].endswith("__e2__seed0__k2") and new["total_steps"] == 3
    assert new["lr"] == exact_step_size(new["initial_loss"], new["k_hat"], 3)


# ------------------------------------------------------------------ files and paths


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.json", "runs/../../x.json", 7])
def test_manifest_paths_stay_inside_the_results_folder(
    smoke: Path, tmp_path: Path, path: object
) -> None:
    out = _copy(smoke, tmp_path / "out")
    manifest_file = out / "figures" / "fig1-smoke.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["runs"][0]["path"] = path
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"outside the results folder|not a relative"):
        figure_report("fig1", out_dir=out, scale="smoke")
    with pytest.raises(ValueError):
        confined_path(out, path, what="test")


def test_strict_json_on_write_and_read(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"x": math.nan, "y": [math.inf]})
    assert "NaN" not in (tmp_path / "a.json").read_text().replace('"NaN"', "")
    (tmp_path / "b.json").write_text('{"x": NaN}')
    with pytest.raises(ValueError, match=r"b\.json.*NaN"):
        read_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('{"x": -Infinity}')
    with pytest.raises(ValueError, match="Infinity"):
        read_json(tmp_path / "c.json")


def test_concurrent_writers_use_unique_temporary_names(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "fig1-smoke.md"
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(50):
                write_text_atomic(target, text)
        except BaseException as err:  # pragma: no cover - the failure being tested
            errors.append(err)

    threads = [threading.Thread(target=write, args=(c * 1000,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.mark.parametrize("extra", ['"a string"', "[1, 2]"])
def test_a_result_with_a_bad_extra_field_is_refused(smoke: Path, tmp_path: Path, extra: str):
    path = tmp_path / "r.json"
    record = json.loads(next((smoke / "runs").glob("*__ours__*")).read_text())
    path.write_text(json.dumps(record).replace('"extra": {', f'"extra": {extra}, "_": {{', 1))
    with pytest.raises(ValueError, match="'extra' must be an object"):
        load_result(path)


# ------------------------------------------------------------------ data


def test_smoke_without_data_says_so_and_records_it(
    tmp_path: Path, no_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "fig1", "--scale", "smoke", "--out", str(tmp_path), "--quiet",
                 "--epochs", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "synthetic set" in out and "no data folder given" in out
    assert all(r["provenance"]["data"]["synthetic_fallback"] for r in load_results(tmp_path))


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_an_explicit_bad_data_dir_is_an_error(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    if kind == "file":
        data.write_text("x")
    elif kind == "empty":
        data.mkdir()
    text = {"missing": "does not exist", "file": "is a file", "empty": "holds no mnist files"}
    argv = ["run", "fig1", "--scale", "smoke", "--out", str(tmp_path / "o"), "--quiet"]
    _one_line_exit_2([*argv, "--data-dir", str(data)], capsys, text[kind])
    assert not (tmp_path / "o" / "figures").exists()


def test_float_cifar_labels_are_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [6.5, 1.0, 2.0, 3.0]}
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="labels must be integers"):
        load_cifar10(tmp_path, train=True)


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("tol", [0.0, 1.0, 2.0, 1e300, -1e-3, math.nan])
def test_tol_is_a_relative_accuracy_in_0_1(tol: float, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="tol"):
        SpectralOptions(tol=tol).validate()
    model = torch.nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match="tol"):
        hessian_spectral_norm(model, F.cross_entropy, batches, tol=tol)
    _one_line_exit_2(["lr", "--tol", str(tol), "--quiet"], capsys, "--tol")


@pytest.mark.parametrize(
    "args",
    [(2.3, 1e-320, 1), (2.3, 1e300, 10**300), (2.3, 1.0, 10**400), (1e-300, 1e300, 10**10)],
)
def test_exact_step_size_refuses_results_out_of_range(args: tuple) -> None:
    with pytest.raises(ValueError, match="not a finite positive number"):
        exact_step_size(*args)
    assert exact_step_size(2.3, 10.0, 100) == pytest.approx(math.sqrt(2 * 2.3 / 1000))


# ------------------------------------------------------------------ one line, exit 2


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["lr", "--device", "meta"], "--device 'meta' cannot train"),
        (["lr", "--device", "mps"], "--device mps"),
        (["lr", "--epochs", "1" + "0" * 300], "--epochs"),
        (["lr", "--model", "fc1x99999999999"], "width"),
        (["lr", "--seed", str(2**64)], "--seed"),
        (["lr", "--seed", "-1"], "--seed"),
        (["run", "fig1", "--executor", "ray", "--checkpoint-every", "2"], "--checkpoint-every"),
        (["run", "fig1", "--ray-timeout", "3"], "--ray-timeout is only used"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "run":
        argv = [*argv, "--scale", "smoke", "--out", str(tmp_path / "o")]
    _one_line_exit_2(argv, capsys, text)


def test_an_unreachable_ray_address_fails_in_bounded_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    start = time.monotonic()
    argv = ["run", "fig1", "--scale", "smoke", "--out", str(tmp_path), "--executor", "ray"]
    _one_line_exit_2([*argv, "--address", "127.0.0.1:1", "--ray-timeout", "2"], capsys, "1")
    assert time.monotonic() - start < 60


def test_a_malformed_manifest_is_one_line(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(smoke, tmp_path / "out")
    for text in ('{"runs": 3}', '["not", "an object"]', '{"runs": [1]}', "{"):
        (out / "figures" / "fig1-smoke.json").write_text(text)
        _one_line_exit_2(
            ["report", "fig1", "--scale", "smoke", "--out", str(out)], capsys, "fig1-smoke.json"
        )


def test_a_failed_run_writes_no_manifest_and_report_refuses(
    tmp_path: Path, no_data: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import exactlr.paper.runner

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("the run broke")

    monkeypatch.setattr(exactlr.paper.runner, "train_run", broken)
    argv = ["run", "fig1", "--scale", "smoke", "--out", str(tmp_path), "--quiet"]
    _one_line_exit_2(argv, capsys, "the run broke")
    assert not (tmp_path / "figures").exists()
    _one_line_exit_2(
        ["report", "fig1", "--scale", "smoke", "--out", str(tmp_path)], capsys, "no results"
    )


def test_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """A write past the file size limit (``ulimit -f``): one line, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("EXACTLR_DATA", None)
    script = (
        f"ulimit -f 1; exec {sys.executable} -m exactlr.cli run fig1 --scale smoke "
        f"--out {tmp_path / 'out'} --quiet --epochs 1"
    )
    proc = subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=600
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "File too large" in err, err


def test_sigterm_checkpoints_then_exits_143_and_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("EXACTLR_DATA", None)
    argv = [sys.executable, "-m", "exactlr.cli", "run", "fig1", "--scale", "smoke", "--out",
            str(out), "--quiet", "--epochs", "400", "--checkpoint-every", "1000"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any((out / "runs").glob("*.json")) if (out / "runs").is_dir() else True:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the next run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert err.decode().count("\n") == 1 and "SIGTERM" in err.decode()
    # The run stopped at the end of an epoch with a checkpoint there (not every 1000).
    (ckpt,) = (out / "checkpoints").glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    assert 1 <= state["epoch"] < 400
    assert [p for p in out.rglob("*.tmp")] == []


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_start_up_is_one_line(tmp_path: Path, signum: int, status: int) -> None:
    """Start-up (importing torch) takes seconds; a signal then is handled like later."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exactlr", "list"], env=env, cwd=tmp_path, stderr=subprocess.PIPE
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():  # pragma: no cover - not Linux
        proc.kill()
        pytest.skip("needs /proc to see the start-up")
    deadline = time.monotonic() + 60
    while "torch" not in maps.read_text() and proc.poll() is None:  # torch being imported
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # pragma: no cover - started faster than the signal
        pytest.skip("the command finished before the signal arrived")
    assert proc.returncode == status, err.decode()
    assert err.decode().count("\n") == 1 and "interrupted" in err.decode(), err.decode()


def test_a_signal_while_training_stops_after_the_epoch_with_a_checkpoint(tmp_path: Path) -> None:
    """Under the CLI's handlers a first signal is deferred to the epoch's end, where the
    run checkpoints and stops; resuming gives the uninterrupted run's metrics."""
    from exactlr.data import synthetic_classification
    from exactlr.models import build_model
    from exactlr.paper import stopping
    from exactlr.paper.schedules import MethodSpec
    from exactlr.paper.training import TrainConfig, train_run

    train, test = synthetic_classification(num_train=128, num_test=32)
    model = build_model("fc1x16", dataset="synthetic", generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig("synthetic", "full", "fc1x16", MethodSpec("c", "constant", 1e-2), 6, 32)
    plain = train_run(cfg, model, train, test)
    ckpt = tmp_path / "run.pt"

    def signal_at_epoch_3(metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics.epoch == 3:
            stopping._handler(signal.SIGTERM, None)  # as the installed handler would

    with pytest.raises(stopping.Interrupted) as stopped:
        train_run(cfg, model, train, test, checkpoint_path=ckpt, on_epoch=signal_at_epoch_3)
    assert stopped.value.signum == signal.SIGTERM
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3  # no checkpoint was due
    resumed = train_run(cfg, model, train, test, checkpoint_path=ckpt)

    def rows(result) -> list[str]:  # type: ignore[no-untyped-def]
        return [repr({k: v for k, v in vars(m).items() if k != "seconds"}) for m in result.metrics]

    assert rows(resumed) == rows(plain)  # repr: NaN metrics compare equal
    # Outside a run with checkpoints the signal is not deferred.
    with pytest.raises(stopping.Interrupted):
        stopping._handler(signal.SIGINT, None)
