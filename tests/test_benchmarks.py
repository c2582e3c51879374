"""The benchmark harness runs and writes well-formed output. No test here asserts a speed."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from benchmarks import (
    bench_deferred,
    bench_kernels,
    bench_models,
    bench_precision,
    memory,
    plot_results,
    profile_kernels,
    providers,
    timing,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cpu_one_thread():
    """Options of the in-process runs below: CPU, one thread (steady timings on a busy machine).
    Restores the thread count afterwards."""
    threads = torch.get_num_threads()
    yield ["--device", "cpu", "--threads", "1"]
    torch.set_num_threads(threads)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _assert_metadata(row: dict, device: str) -> None:
    """Columns saying where, when and how a row was measured (every run here is single-threaded)."""
    for column in ("device", "torch", "triton", "commit", "date"):
        assert row[column], f"empty {column}"
    assert row["torch"] == torch.__version__
    assert row["clock"] == {"cpu": "thread-cpu", "cuda": "cuda-events"}[device]
    if device == "cuda":
        assert row["device"] == torch.cuda.get_device_name()


@pytest.mark.parametrize("device", DEVICES)
def test_bench_kernels_quick_writes_csv_and_plot(tmp_path, device):
    names = ["torch", "torch+relu", "bnfused-reference", "bnfused+relu", "scratch"]
    shapes = ["4x3x5x5", "6x7"]
    csv_path, png_path = tmp_path / "kernels.csv", tmp_path / "kernels.png"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [
        sys.executable, "benchmarks/bench_kernels.py", "--quick", "--device", device, "--layout", "channels_last",
        "--threads", "1",
        "--providers", ",".join(names), "--shapes", ",".join(shapes), "--csv", str(csv_path), "--plot", str(png_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped" not in done.stdout, done.stdout

    header, rows = _read_csv(csv_path)
    assert header == list(bench_kernels.COLUMNS)
    keys = sorted((r["provider"], r["shape"], r["mode"]) for r in rows)
    assert keys == sorted((p, s, m) for p in names for s in shapes for m in memory.MODES)
    for r in rows:
        assert (r["dtype"], r["layout"]) == ("float32", "channels_last")
        for column in bench_kernels.NUMERIC_COLUMNS:
            value = float(r[column])
            assert math.isfinite(value) and value >= 0, (column, r[column])
        assert float(r["q20_ms"]) <= float(r["ms"]) <= float(r["q80_ms"])
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0
        assert float(r["roofline_frac"]) == pytest.approx(float(r["gbps"]) / float(r["copy_gbps"]), rel=1e-3)
        assert float(r["x_copy_frac"]) == pytest.approx(float(r["gbps"]) / float(r["x_copy_gbps"]), rel=1e-3)
        shape = tuple(int(d) for d in r["shape"].split("x"))
        assert int(r["min_bytes"]) == memory.min_bytes(
            r["mode"], shape, torch.float32, torch.float32, r["provider"].endswith("+relu")
        )
        assert int(r["saved_bytes"]) >= math.prod(shape) * 4  # every provider keeps at least x
        if r["provider"] == "torch":
            assert float(r["speedup_vs_torch"]) == 1.0
        _assert_metadata(r, device)
    assert {r["backend"] for r in rows if r["provider"] == "bnfused-reference"} == {"reference"}
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    plot_results.main([str(csv_path), "--out", str(tmp_path / "from_csv.png")])  # the CSV alone is enough
    assert (tmp_path / "from_csv.png").read_bytes().startswith(PNG_MAGIC)
    assert "fwd-train ms" in done.stdout  # the printed table
    assert done.stdout.splitlines()[-3].startswith("Found (speedup, geometric mean over 2 shapes")  # then CSV, PNG


def test_profile_kernels_lists_what_each_provider_runs(tmp_path):
    csv_path = tmp_path / "profile.csv"
    argv = ["--quick", "--device", "cpu", "--shapes", "8x16x8x8", "--layout", "nchw", "--csv", str(csv_path)]
    rows = profile_kernels.main(argv)
    ops: dict[tuple, list] = {}
    for row in rows:
        ops.setdefault((row["provider"], row["mode"]), []).append(row["kernel"])
    assert any("native_batch_norm" in k for k in ops["torch", "fwd-train"])
    assert any("bnfused" in k for k in ops["bnfused", "fwd-train"]) and ops["bnfused", "bwd"]
    assert not any("bnfused" in k for k in ops["torch", "fwd-train"] + ops["torch", "bwd"])
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and written[0]["commit"] and float(written[0]["us"]) > 0
    with pytest.raises(SystemExit, match="--modes: unknown step"):
        profile_kernels.main(["--quick", "--device", "cpu", "--modes", "step"])
    with pytest.raises(SystemExit, match="--blocks: expected CxS"):
        profile_kernels.main(["--quick", "--device", "cpu", "--blocks", "32x48"])


def test_bench_deferred_times_each_case_and_mode_and_restores_resolve():
    threads = torch.get_num_threads()
    resolve = bnfused.backends.resolve
    try:
        rows = bench_deferred.main(["--device", "cpu", "--rounds", "1", "--calls", "3"])
    finally:
        torch.set_num_threads(threads)
    assert [(r["case"], r["mode"]) for r in rows] == [
        (case, mode) for mode in ("train", "eval") for case in ("batchnorm", "batchnorm+hardswish")
    ]
    assert all(r["torch_us"] > 0 and r["bnfused_us"] > 0 for r in rows)
    assert bnfused.backends.resolve is resolve


def test_profile_kernels_runs_triton_on_each_tile_asked_for():
    argv = ["--device", "cpu", "--shapes", "2x4x3x3", "--layout", "nchw", "--providers", "bnfused-triton,torch"]
    rows = profile_kernels.main([*argv, "--blocks", "2x8,4x4,8x256,2x8", "--calls", "1", "--modes", "fwd-train"])
    # Each tile as the plan takes it (8x256 is capped at 4 channels, 9 columns), each once.
    assert [p for p in dict.fromkeys(r["provider"] for r in rows)] == [
        "bnfused-triton", "bnfused-triton@2x8", "bnfused-triton@4x4", "bnfused-triton@4x16", "torch"
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="--shapes"):
        profile_kernels.main(["--device", "cpu", "--shapes", "1x1"])


def test_triton_codegen_reports_registers_and_vector_accesses(tmp_path):
    """Compiles for sm_90 without a GPU (a fresh interpreter: this process interprets Triton)."""
    from triton.compiler import ASTSource

    if "constexprs" not in ASTSource.__init__.__code__.co_varnames:
        pytest.skip("ahead-of-time compile through ASTSource(constexprs=...) needs triton >= 3.3")
    csv_path = tmp_path / "codegen.csv"
    argv = ["--shapes", "8x3x14x14,8x3x7x7", "--layout", "nchw", "--kernels", "normalize", "--csv", str(csv_path)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/triton_codegen.py", *argv], cwd=Path(__file__).parent.parent,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(csv_path) as f:
        rows = {row["shape"]: row for row in csv.DictReader(f)}
    assert rows["8x3x14x14"]["col_vec"] == "4" and rows["8x3x7x7"]["col_vec"] == "1"
    assert "v4x32" in rows["8x3x14x14"]["loads"] and "v4x32" in rows["8x3x14x14"]["stores"]
    assert "v4" not in rows["8x3x7x7"]["stores"]  # 49-value rows: no aligned vectors to move
    assert all(int(row["registers"]) > 0 and row["spilled"] == "0" for row in rows.values())


def test_bench_kernels_compile_provider_runs(cpu_one_thread):
    rows = bench_kernels.main(["--quick", *cpu_one_thread, "--providers", "torch,compile", "--shapes", "4x3x4x4"])
    assert sorted((r["provider"], r["mode"]) for r in rows) == sorted(
        (p, m) for p in ("torch", "compile") for m in memory.MODES
    )


def test_bench_kernels_repeat_keeps_one_row_per_case(cpu_one_thread):
    argv = ["--quick", *cpu_one_thread, "--providers", "torch,scratch", "--shapes", "6x7", "--modes", "fwd-train,bwd"]
    rows = bench_kernels.main([*argv, "--repeat", "2"])
    assert sorted((r["provider"], r["mode"]) for r in rows) == sorted(
        (p, m) for p in ("torch", "scratch") for m in ("fwd-train", "bwd")
    )


def test_functional_providers_call_the_functionals_and_compare_with_torchs(monkeypatch, capsys, cpu_one_thread):
    """+functional: the layer's tensors through F.batch_norm / bnfused.functional.batch_norm, each row's
    speedup against torch called the same way, and the run's findings name that pair."""
    calls = []
    for module, name in ((bnfused.functional, "batch_norm"), (providers.F, "batch_norm")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _m=module, **k: calls.append(_m) or _f(*a, **k))
    argv = ["--quick", *cpu_one_thread, "--providers", "torch,torch+functional,bnfused-reference+functional",
            "--shapes", "6x7", "--modes", "fwd-train,fwd-eval"]  # fmt: skip
    rows = bench_kernels.main(argv)
    assert bnfused.functional in calls and providers.F in calls
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd-train", "fwd-eval"):
        assert float(by[("torch+functional", mode)]["speedup_vs_torch"]) == 1.0  # its own baseline
        assert float(by[("torch", mode)]["speedup_vs_torch"]) == 1.0
    assert "vs torch+functional" in capsys.readouterr().out
    layer = providers.build_layer(providers.parse("bnfused-reference+functional+relu"), (6, 7), torch.device("cpu"),
                                  torch.float32)  # fmt: skip
    x = torch.randn(6, 7)
    torch.testing.assert_close(layer(x), torch.relu(F.batch_norm(x, None, None, training=True)))
    with pytest.raises(ValueError, match=r"\+functional applies to torch and bnfused only"):
        providers.parse("compile+functional")


def test_bench_kernels_failing_provider_is_reported_and_skipped(monkeypatch, capsys, cpu_one_thread):
    build = providers.build_layer

    def build_or_fail(provider, *args):
        if provider.base == "scratch":
            raise RuntimeError("no kernel for this shape")
        return build(provider, *args)

    monkeypatch.setattr(providers, "build_layer", build_or_fail)
    rows = bench_kernels.main(["--quick", *cpu_one_thread, "--providers", "torch,scratch", "--shapes", "6x7"])
    assert {r["provider"] for r in rows} == {"torch"} and len(rows) == len(memory.MODES)
    out = capsys.readouterr().out
    assert "scratch 6x7 setup: skipped (RuntimeError: no kernel for this shape)" in out


def test_bad_options_exit_with_a_message():
    for argv, message in (
        (["--shapes", "8x0"], "bad shape"),
        (["--providers", "cudnn"], "unknown provider"),
        (["--modes", "fwd"], "--modes: unknown fwd"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--full"], "--quick and --full: choose one"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench_kernels.main(["--quick", "--device", "cpu", *argv])


def test_bench_precision_compares_each_provider_with_float64(tmp_path, capsys):
    csv_path = tmp_path / "precision.csv"
    argv = ["--device", "cpu", "--shapes", "64x40,4x8x5x5", "--offsets", "0,1e4", "--csv", str(csv_path)]
    rows = bench_precision.main([*argv, "--providers", "torch,reference,no-such-backend"])
    assert "no-such-backend on 64x40 nchw" in capsys.readouterr().err  # reported, and the run goes on
    header, read = _read_csv(csv_path)
    assert header[: len(bench_precision.COLUMNS)] == bench_precision.COLUMNS
    cases = {(r["shape"], r["layout"], r["offset"], r["values"], r["provider"]) for r in read}
    shapes = [("64x40", "nchw"), ("4x8x5x5", "nchw"), ("4x8x5x5", "channels_last")]
    want = {(s, lay, o, "float32", p) for s, lay in shapes for o in ("0", "10000") for p in ("torch", "reference")}
    assert cases == want
    assert len(rows) == len(read)
    for r in read:
        assert 0 <= float(r["mean_error"]) < 1e-2 and 0 <= float(r["var_error"]) < 1e-3, r
        if r["provider"] == "reference":  # float64 arithmetic: only the float32 running buffers round
            assert float(r["var_error"]) < 2e-7, r


def test_bench_precision_of_values_rounded_to_bfloat16():
    argv = ["--device", "cpu", "--shapes", "64x40", "--offsets", "1e3", "--values", "float32,bfloat16"]
    rows = bench_precision.main([*argv, "--providers", "reference"])
    assert [r["values"] for r in rows] == ["float32", "bfloat16"]
    x = bench_precision.make_input((64, 40), 1e3, "nchw", torch.device("cpu"), "bfloat16")
    assert x.dtype == torch.float32 and torch.equal(x, x.bfloat16().float()) and x.unique().numel() < 10
    for r in rows:  # float64 arithmetic: only the float32 running buffers round
        assert float(r["mean_error"]) < 1e-3 and float(r["var_error"]) < 2e-7, r


def test_bench_precision_bad_options_exit_with_a_message():
    for argv, message in (
        (["--offsets", "nan"], "must be finite"),
        (["--offsets=1e30"], "below 2\\*\\*24"),
        (["--layout", "channels_last", "--shapes", "4x3"], "nothing to measure"),
        (["--providers", ","], "nothing to measure"),
        (["--values", ","], "nothing to measure"),
        (["--values", "float16"], "--values takes float32 and/or bfloat16"),
        (["--values", "bfloat16", "--offsets", "1e4"], "below 2\\*\\*11"),
        (["--providers", "no-such-backend", "--shapes", "4x3"], "no provider ran"),
        (["--device", "foo"], "device"),
        (["--shapes", "4x0"], "bad shape"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench_precision.main(["--device", "cpu", *argv] if argv[0] != "--device" else argv)


def test_bench_models_quick_writes_csv(tmp_path, cpu_one_thread):
    csv_path = tmp_path / "models.csv"
    names = ["torch", "compile", "bnfused-reference", "bnfused-reference+compile", "scratch"]
    argv = ["--quick", *cpu_one_thread, "--models", "mnist_bn_mlp,lenet", "--providers", ",".join(names)]
    rows = bench_models.main([*argv, "--layouts", "nchw", "--csv", str(csv_path)])
    header, read = _read_csv(csv_path)
    assert header == list(bench_models.COLUMNS)
    assert len(read) == len(rows)
    cases = {(r["model"], r["mode"], r["layout"], r["provider"]) for r in read}
    assert cases == {
        (m, mode, "nchw", p) for m in ("mnist_bn_mlp", "lenet") for mode in ("train", "eval") for p in names
    }
    for r in read:
        for column in bench_models.NUMERIC_COLUMNS:
            assert math.isfinite(float(r[column])) and float(r[column]) > 0, (column, r[column])
        assert float(r["samples_per_s"]) == pytest.approx(int(r["batch"]) / (float(r["ms"]) * 1e-3), rel=1e-4)
        assert r["baseline"] == ("compile" if r["provider"].endswith("compile") else "torch")
        if r["provider"] == r["baseline"]:
            assert float(r["ratio"]) == 1.0
        assert r["backend"] == ("reference" if r["provider"].startswith("bnfused") else "")
        eager_train = r["mode"] == "train" and "compile" not in r["provider"]
        assert (float(r["saved_mb"]) > 0) if eager_train else r["saved_mb"] == "", r
        assert float(r["peak_mb"]) > 0  # the profiler's allocation events on CPU
        _assert_metadata(r, "cpu")


def test_bench_models_layouts_and_modes(cpu_one_thread, capsys):
    argv = ["--quick", *cpu_one_thread, "--models", "resnet18,mnist_bn_mlp", "--providers", "torch,bnfused-reference"]
    rows = bench_models.main([*argv, "--modes", "eval", "--layouts", "channels_last"])
    # The MLP takes flattened images: it has no channels_last case.
    assert [(r["model"], r["layout"], r["mode"], r["provider"]) for r in rows] == [
        ("resnet18", "channels_last", "eval", "torch"),
        ("resnet18", "channels_last", "eval", "bnfused-reference"),
    ]
    assert rows[0]["input_shape"] == "3x32x32"
    assert "bnfused-reference eval: time ratio geometric mean" in capsys.readouterr().out


def test_bench_models_more_networks_and_the_video_layout(cpu_one_thread):
    """--models takes set names (all: the default, more: the other torchvision networks); the video
    network's channels_last is channels_last_3d, for its model and its clips alike."""
    parse = bench_models.parse_provider
    assert bench_models._choose(
        "more,resnet18,more", list(bench_models.MODELS), "--models", bench_models.MODEL_SETS
    ) == [*bench_models.MODEL_SETS["more"], "resnet18"]
    assert "r3d_18" not in bench_models.MODEL_SETS["all"] and "resnet18" not in bench_models.MODEL_SETS["more"]
    with pytest.raises(SystemExit, match="--models: unknown densenet"):
        bench_models.main(["--quick", "--models", "densenet"])
    video = bench_models.build_model("r3d_18", parse("bnfused-reference"), torch.device("cpu"), torch.float32,
                                     "channels_last", "eval")  # fmt: skip
    written = bench_models.MODELS["r3d_18"].build()
    assert (
        sum(isinstance(m, bnfused.BatchNorm3d) for m in video.modules())
        == sum(isinstance(m, nn.BatchNorm3d) for m in written.modules())
        > 0
    )
    conv = next(m for m in video.modules() if isinstance(m, nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    argv = ["--quick", *cpu_one_thread, "--models", "r3d_18", "--providers", "torch,bnfused-reference"]
    rows = bench_models.main([*argv, "--modes", "eval", "--layouts", "channels_last"])
    assert [(r["model"], r["layout"], r["provider"]) for r in rows] == [
        ("r3d_18", "channels_last", "torch"),
        ("r3d_18", "channels_last", "bnfused-reference"),
    ]
    assert rows[0]["input_shape"] == f"3x{bench_models.VIDEO_FRAMES}x32x32"


def test_compiled_providers_stay_compiled_case_after_case(cpu_one_thread):
    """Dynamo keeps recompile_limit entries per code object; past it, a model whose forward is code
    already seen (the seed models are all nn.Sequential) silently runs eagerly. The benchmark resets
    Dynamo per case, so no case meets the limit, here lowered to what one case needs."""
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        # config.patch, not monkeypatch: pytest 9.2's monkeypatch undoes a setattr on a torch config
        # module with a delattr, which deletes the setting for the rest of the process.
        with torch._dynamo.config.patch(**{limit_name: 2}):
            argv = ["--quick", *cpu_one_thread, "--models", "mnist_bn_mlp,mnist_bn_after_relu", "--layouts", "nchw"]
            rows = bench_models.main([*argv, "--providers", "compile,bnfused-reference+compile"])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert len(rows) == 8  # 2 models x 2 modes x 2 providers, none skipped
    assert not [m for m in messages if "_limit" in m], messages


def test_again_providers_time_a_second_copy_of_the_baseline(cpu_one_thread):
    """torch-again / compile-again: the model as written, built a second time, with its ratio to the
    baseline of the same run (the noise floor a bnfused ratio is read against)."""
    parse = bench_models.parse_provider
    assert parse("torch-again") == bench_models.Provider("torch-again", "torch", None, False)
    assert parse("compile-again") == bench_models.Provider("compile-again", "torch", None, True)
    assert parse("compile-again").baseline == "compile"
    argv = ["--quick", *cpu_one_thread, "--models", "mnist_bn_mlp", "--modes", "eval", "--repeat", "2"]
    rows = bench_models.main([*argv, "--providers", "torch,torch-again"])
    assert [r["provider"] for r in rows] == ["torch", "torch-again"]
    again = rows[1]
    assert again["baseline"] == "torch" and again["backend"] == ""
    assert 0.2 < float(again["ratio"]) < 5  # the same model: a ratio near 1, not a missing one


def test_converted_models_really_use_the_provider():
    cpu, f32 = torch.device("cpu"), torch.float32
    parse = bench_models.parse_provider
    torch_model = bench_models.build_model("mnist_bn_mlp", parse("torch"), cpu, f32, "nchw", "train")
    fused = bench_models.build_model("mnist_bn_mlp", parse("bnfused-reference"), cpu, f32, "nchw", "train")
    scratch = bench_models.build_model("resnet18", parse("scratch"), cpu, f32, "channels_last", "eval")
    assert sum(isinstance(m, nn.BatchNorm1d) for m in torch_model.modules()) == 2
    assert [m.activation for m in fused.modules() if hasattr(m, "activation")] == ["relu", "relu"]  # fuse_relu=True
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in scratch.modules())
    assert not scratch.training and scratch.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert parse("compile") == bench_models.Provider("compile", "torch", None, True)
    assert parse("bnfused-cpp+compile").baseline == "compile" and parse("scratch").baseline == "torch"
    assert parse("bnfused-cpp+inplace+compile-kernels") == bench_models.Provider(
        "bnfused-cpp+inplace+compile-kernels", "bnfused", "cpp", True, "kernels", True
    )
    leaky = bench_models.build_model("resnet50_leaky", parse("bnfused-reference+inplace"), cpu, f32, "nchw", "train")
    assert not any(isinstance(m, nn.ReLU) for m in leaky.modules())
    assert sum(getattr(m, "memory", None) == "inplace" for m in leaky.modules()) == 53
    for bad, message in (
        ("torch+compile", "unknown provider"),
        ("scratch+inplace", "unknown provider"),
        ("bnfused-magic", "unknown bnfused backend"),
    ):
        with pytest.raises(ValueError, match=message):
            parse(bad)
    with pytest.raises(SystemExit, match="--modes: unknown step"):
        bench_models.main(["--quick", "--modes", "step"])


def test_plot_refuses_rows_it_cannot_plot(tmp_path):
    with pytest.raises(ValueError, match="no mode, shape column"):
        plot_results.plot_speedups([{"model": "lenet", "provider": "torch", "speedup_vs_torch": "1"}], "x.png")
    row = {"mode": "bwd", "shape": "6x7", "provider": "torch", "speedup_vs_torch": ""}
    with pytest.raises(ValueError, match="is the torch provider in the run"):
        plot_results.plot_speedups([row], str(tmp_path / "x.png"))


def test_default_run_is_a_first_look_and_full_the_whole_sweep():
    parser = bench_kernels.build_parser()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    first_look = bench_kernels.sweep_for(parser.parse_args([]), cpu)
    assert first_look.providers == ("torch", "torch+relu", "compile", "bnfused", "bnfused+relu")
    assert len(bench_kernels.parse_shapes(first_look.shapes)) == 4
    full = bench_kernels.sweep_for(parser.parse_args(["--full"]), cpu)
    assert full.providers is None and full.budget == timing.FULL  # every default provider
    assert bench_kernels.parse_shapes(full.shapes) == bench_kernels.parse_shapes("cpu,lenet-mlp")
    assert bench_kernels.sweep_for(parser.parse_args(["--full"]), cuda).shapes == "resnet50,lenet-mlp"
    assert bench_kernels.sweep_for(parser.parse_args(["--quick"]), cuda) == bench_kernels.QUICK


def test_findings_are_geometric_means_per_mode():
    def row(provider, shape, mode, ms, backend=""):
        return {"provider": provider, "shape": shape, "mode": mode, "ms": str(ms), "backend": backend}

    rows = [
        row("torch", "a", "bwd", 4.0), row("torch", "b", "bwd", 1.0), row("torch+relu", "a", "bwd", 3.0),
        row("bnfused-cpp", "a", "bwd", 1.0, "cpp"), row("bnfused-cpp", "b", "bwd", 1.0, "cpp"),
        row("bnfused+relu", "a", "bwd", 1.0, "cpp"),
    ]  # fmt: skip
    line = bench_kernels.findings(rows, ["bwd"])
    # sqrt(4 * 1) = 2 for the plain layer; fused BN + ReLU against torch's BN then ReLU on the one shape both ran.
    assert line.endswith("bnfused-cpp vs torch: bwd 2.00x; bnfused+relu [cpp] vs torch+relu: bwd 3.00x")
    assert "nothing to compare" in bench_kernels.findings(rows[:3], ["bwd"])


def test_findings_carry_a_caution_when_other_processes_load_the_cpus(monkeypatch, capsys, cpu_one_thread):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    argv = ["--quick", "--device", "cpu", "--threads", "2", "--providers", "torch,bnfused-reference", "--shapes", "6x7"]
    bench_kernels.main([*argv, "--modes", "fwd-eval"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("Found") and lines[-1].startswith("Caution, load average 9.0 on 2 CPUs")


def test_parse_shapes_sets_explicit_and_errors():
    assert bench_kernels.parse_shapes("cpu") == [(32, 64, 56, 56), (128, 256, 14, 14)]
    assert bench_kernels.parse_shapes("8x3x4x4, 64x512,8x3x4x4") == [(8, 3, 4, 4), (64, 512)]
    assert len(bench_kernels.parse_shapes("resnet50,lenet-mlp")) == 11
    for bad in ("64", "8x3x0x4", "1x3", "axb", "1x2x3x4x5x6", "nope"):
        with pytest.raises(ValueError, match="bad shape"):
            bench_kernels.parse_shapes(bad)


def test_provider_names():
    p = providers.parse("bnfused-reference+relu")
    assert (p.base, p.backend, p.relu, p.compiled) == ("bnfused", "reference", True, False)
    assert providers.parse("bnfused").backend == "auto"
    assert providers.parse("compile+relu").compiled
    for bad, message in (("cudnn", "unknown provider"), ("bnfused-magic", "unknown bnfused backend")):
        with pytest.raises(ValueError, match=message):
            providers.parse(bad)
    defaults = providers.default_names(torch.device("cpu"))
    assert defaults[:4] == ["torch", "torch+relu", "compile", "compile+relu"]
    assert "bnfused-reference" in defaults and "bnfused-triton" not in defaults
    backends = providers.available_backends(torch.device("cpu"))
    assert backends[-1] == "reference"  # auto's order for the device, the reference last
    assert len({id(bnfused.backends.module(b)) for b in backends}) == len(backends)  # each implementation once


def test_byte_model():
    shape, e, v = (4, 8, 3, 3), 4 * 8 * 9 * 2, 8 * 4  # float16 activations, float32 parameters
    assert memory.min_bytes("fwd-train", shape, torch.float16, torch.float32, False) == 2 * e + 8 * v
    assert memory.min_bytes("fwd-eval", shape, torch.float16, torch.float32, True) == 2 * e + 4 * v
    assert memory.min_bytes("bwd", shape, torch.float16, torch.float32, False) == 3 * e + 5 * v
    assert memory.min_bytes("bwd", shape, torch.float16, torch.float32, True) == 4 * e + 5 * v
    assert memory.min_bytes("step", shape, torch.float16, torch.float32, True) == 6 * e + 13 * v


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    # torch's BatchNorm keeps x and the (C,) fp32 batch mean and invstd; its parameters are not counted.
    assert memory.saved_bytes(nn.BatchNorm2d(8), x) == x.nbytes + 2 * 8 * 4
    # Two ops saving the same tensor cost it once.
    double = nn.Sequential(nn.Identity())
    double.forward = lambda t: t * t
    assert memory.saved_bytes(double, x) == x.nbytes


def test_clock_follows_the_thread_count(cpu_one_thread):
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    assert timing.clock_name(cpu) == "wall"  # other threads' work would be missed by one thread's clock
    torch.set_num_threads(1)
    assert timing.clock_name(cpu) == "thread-cpu"
    assert timing.clock_name(torch.device("cuda")) == "cuda-events"


def test_timing_quantiles_are_ordered():
    result = timing.measure(lambda: torch.ones(64).sum(), torch.device("cpu"), timing.QUICK)
    assert 0 < result.q20_ms <= result.ms <= result.q80_ms
    assert timing.copy_bandwidth_gbps(torch.device("cpu"), timing.QUICK, 1 << 20) > 0


def test_cpu_peak_memory_is_the_most_allocated_at_once():
    def step():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 6 MB live: the peak
        del a
        c = torch.empty(250, 1000)  # 3 MB live
        return b, c

    peak = memory.peak_memory_bytes(step, torch.device("cpu"))
    assert 6_000_000 <= peak < 6_001_000
