"""What the Triton backend's kernels compile to on a GPU, without a GPU: registers per thread and
global loads and stores by vector width, per kernel, for the plans given shapes get.

Triton compiles for a target named here (sm_90 by default) with the ``ptxas`` it ships; nothing is
launched, so this runs on any machine with triton installed. Scalar accesses (``ld.b32``) on a
contiguous axis, or registers past 128 (two 256-thread programs per SM at most), show a kernel that
cannot run at memory speed before a GPU ever times it.

    python benchmarks/triton_codegen.py --shapes 256x1024x14x14 --layout nchw,channels_last
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.bench_kernels import parse_shapes, shape_text  # noqa: E402
from bnfused.backends import triton as launcher  # noqa: E402
from bnfused.backends import triton_kernels as kernels  # noqa: E402

# Each kernel with the flags of a plain training layer (weight and bias, no activation or residual).
FLAGS = {
    "ACT": 0, "HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": False, "ROUND_BF16": False,
    "ROUND_BF16_RUNNING": False, "HAS_RUNNING_MEAN": True, "HAS_RUNNING_VAR": True, "FROM_RUNNING_VAR": False,
    "NEED_G_XHAT": True, "NEED_DX": True, "STORE_G": False, "TRAINING": True,
}  # fmt: skip
KERNELS = {
    "stats_partial": kernels._stats_partial_kernel,
    "normalize": kernels._normalize_kernel,
    "forward_fused": kernels._forward_fused_kernel,
    "backward_partial": kernels._backward_partial_kernel,
    "backward_dx": kernels._backward_dx_kernel,
    "backward_fused": kernels._backward_fused_kernel,
}
# Pointers to tensors of the input's dtype; every other pointer is to fp32 per-channel vectors.
DATA_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "residual_ptr", "dres_ptr"}
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ("shape", "dtype", "layout", "kernel", "col_vec", "warps", "registers", "spilled", "loads", "stores")


def compiler_supported() -> str | None:
    """Why this triton cannot compile here, or None (the ASTSource API of triton 3.3 and later)."""
    if "constexprs" not in ASTSource.__init__.__code__.co_varnames:
        return f"triton {triton.__version__}: an older ASTSource API"
    if not _ptxas().exists():
        return "triton's ptxas is not installed"
    return None


def _ptxas(arch: int = 90) -> Path:
    """The ptxas Triton assembles sm_<arch> code with: Triton's choice where it names one (3.9 takes its
    newer ptxas from sm_90 on, and writes PTX the older one refuses), else the one it ships for the
    architecture (a second one for sm_100 and later)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(arch).path)
    except (ImportError, AttributeError, TypeError, RuntimeError):  # older triton, or no ptxas found
        pass
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return folder / "ptxas-blackwell" if arch >= 100 and (folder / "ptxas-blackwell").exists() else folder / "ptxas"


def _signature(fn, runtime: dict, constexprs: dict, dtype: torch.dtype):
    """(signature, constexprs, attributes) as a launch with these values would specialise them: an
    integer equal to 1 becomes a constant, one divisible by 16 gets that hint, pointers are aligned."""
    signature, constants, attributes = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES[dtype] if name in DATA_POINTERS else "*fp32"
            attributes[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(runtime[name], float):
            signature[name] = "fp32"
        elif runtime[name] == 1:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if runtime[name] % 16 == 0:
                attributes[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attributes


def compile_kernel(fn, runtime: dict, constexprs: dict, dtype: torch.dtype, num_warps: int, arch: int) -> dict:
    """Registers, spilled bytes and global access counts by width of ``fn`` compiled for sm_<arch>."""
    source = ASTSource(fn, *_signature(fn, runtime, constexprs, dtype))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([str(_ptxas(arch)), "-v", "--gpu-name", gpu, str(path), "-o", os.devnull],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"ptxas for {gpu} failed: {done.stderr.strip()[-500:]}")
    info = done.stderr
    accesses = Counter()
    for op, width, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z]\w*)*?(\.v[248])?\.b(\d+)", ptx):
        accesses[op, f"{width[1:] + 'x' if width else ''}{bits}"] += 1
    return {
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spilled": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "loads": " ".join(f"{w}:{n}" for (op, w), n in sorted(accesses.items()) if op == "ld"),
        "stores": " ".join(f"{w}:{n}" for (op, w), n in sorted(accesses.items()) if op == "st"),
    }


def plan_for(shape: tuple[int, ...], dtype: torch.dtype, layout: str):
    """The launcher's plan for an input of this shape, dtype and layout (no memory is allocated)."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return launcher._make_plan(x)


def run(shapes, dtypes, layouts, names, arch: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            for layout in layouts:
                plan = plan_for(shape, DTYPES[dtype_name], layout)
                blocks = launcher._blocks(plan)
                num_warps = blocks.pop("num_warps")
                runtime = {
                    "C": plan.C, "cols": plan.cols, "col_blocks": plan.col_blocks, "num_tiles": plan.num_tiles,
                    "tiles_per_chunk": plan.tiles_per_chunk, "stride_row": plan.stride_row,
                    "stride_col": plan.stride_col, "stride_c": plan.stride_c,
                    "slope": 0.01, "inv_count": 1.0 / plan.count, "eps": 1e-5, "momentum": 0.1,
                    "total": float(plan.count),  # launched as a float
                }  # fmt: skip
                for name in names:
                    fn = KERNELS[name]
                    constexprs = {**blocks, **{k: v for k, v in FLAGS.items() if k in fn.arg_names}}
                    found = compile_kernel(fn, runtime, constexprs, DTYPES[dtype_name], num_warps, arch)
                    rows.append({"shape": shape_text(shape), "dtype": dtype_name, "layout": layout, "kernel": name,
                                 "col_vec": plan.col_vec, "warps": num_warps, **found})  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="resnet50", help="shape sets or NxCx... (bench_kernels.py's)")
    parser.add_argument("--dtype", default="float32", help=f"comma-separated: {', '.join(DTYPES)}")
    parser.add_argument("--layout", default="nchw,channels_last", help="comma-separated: nchw, channels_last")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated kernel names")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number (default 90)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    args = parser.parse_args(argv)
    reason = compiler_supported()
    if reason:
        raise SystemExit(f"cannot compile here: {reason}")
    if args.arch < 70:
        raise SystemExit(f"--arch: Triton compiles for compute capability 70 and later, got {args.arch}")
    lists = {
        name: [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        for name in ("dtype", "layout", "kernels")
    }
    for option, allowed in (("dtype", DTYPES), ("layout", ("nchw", "channels_last")), ("kernels", KERNELS)):
        unknown = [v for v in lists[option] if v not in allowed]
        if unknown:
            raise SystemExit(f"--{option}: unknown {', '.join(unknown)}; expected {', '.join(allowed)}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        raise SystemExit(f"--shapes: {err}") from None
    rows = run(shapes, lists["dtype"], lists["layout"], lists["kernels"], args.arch)
    print(f"triton {triton.__version__}, sm_{args.arch}, plans of bnfused.backends.triton at {report.git_commit()}")
    print(report.format_table(COLUMNS, ([str(row[c]) for c in COLUMNS] for row in rows)))
    if args.csv:
        report.write_csv(args.csv, rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
