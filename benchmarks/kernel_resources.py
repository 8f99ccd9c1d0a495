"""What the compiler made of the Triton kernels, for an sm_90 GPU, without a GPU.

A report, not a test (the test suite checks the two properties that matter: 16-byte vector
loads and no register spills). For each elementwise kernel, in fp32 and bf16, with weight
decay on and the fused-clip/AMP hooks compiled in: registers per thread, local memory
(spills), shared memory, and how many 16-byte global loads and stores the machine code has.
Uses the ``ptxas``/``cuobjdump`` that ship inside Triton's wheel.

Why it matters: a memory-bound kernel needs enough bytes in flight to cover the latency of
HBM (Little's law: 4.8 TB/s x ~0.6 us is ~3 MB across 132 SMs, ~22 KB per SM). A program
moves BLOCK = 2048 elements per stream with 4 warps: 16 fp32 per thread per stream, four
16-byte loads each, so even at the register count below, a few resident programs per SM
keep far more than that in flight.

    python benchmarks/kernel_resources.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_optim.backends.triton import launcher
from lightning_optim.registry import create_optimizer, optimizers

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
COMMON = dict(W=7, BLOCK=launcher.BLOCK["cuda"], ALIGNED=True, HAS_SCALE=True, HAS_FOUND=True, HAS_CLIP=False,
              MASTER=False, MSLOT=5, MAXIMIZE=False, WD=True)


def _kernels() -> dict[str, tuple[str, dict]]:
    """One entry per distinct (kernel, rule switches) of the registry's names at their
    defaults (with weight decay on, and Coupled Adam's coupled group), read from the rule
    table: a new rule's kernel is listed without an edit here."""
    found: dict[str, tuple[str, dict]] = {}
    for name in optimizers():
        with warnings.catch_warnings():  # "coupled=True, but only CoupledAdam couples"
            warnings.simplefilter("ignore")
            opt = create_optimizer({"name": name, "weight_decay": 0.1},
                                   [{"params": [torch.zeros(2, 2, requires_grad=True)], "coupled": True}],
                                   backend="reference")
        group = opt.param_groups[0]
        plan = opt.spec_for(group).launch(group)
        switches = {k: v for k, v in plan.switches.items() if k != "WD"}
        if all((plan.kernel, switches) != seen for seen in found.values()):
            found[f"{plan.kernel} ({name})"] = (plan.kernel, switches)
    return found


KERNELS = _kernels()


def compile_for_sm90(name: str, switches: dict, kind: int, **constexprs) -> dict:
    """``triton.compile(...).asm`` (ptx, cubin...) of kernel ``name`` for an sm_90 target, with
    ``KIND = GKIND = kind`` (0 fp32, 1 bf16) and the rule's ``switches`` over :data:`COMMON`
    (``constexprs`` override those)."""
    fn = getattr(launcher.kernels(torch.device("cuda")), name)
    signature = {p.name: ("*i64" if p.name == "table" else "*i32" if p.name == "blocks" else "*fp32") if i < 5
                 else "fp32" for i, p in enumerate(fn.params) if not p.is_constexpr}
    # ASTSource takes every constexpr: the ones a launch plan leaves out get the kernel's default.
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={**defaults, **COMMON, **switches, "KIND": kind, "GKIND": kind, **constexprs})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True}).asm


def resources(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL (spills and stack arrays, bytes per thread) and SHARED of a compiled kernel,
    and its 16-byte global loads (LDG128) and stores (STG128), from ``cuobjdump``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    field = {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED):(\d+)", usage)}
    if set(field) != {"REG", "LOCAL", "SHARED"}:  # the tool's output changed: no silent zeros
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{usage}")
    return {**field, "LDG128": sass.count("LDG.E.128"), "STG128": sass.count("STG.E.128")}


def main() -> int:
    print(f"triton {triton.__version__} | target sm_90 | BLOCK {COMMON['BLOCK']} | 4 warps")
    print()
    print("| kernel | params | registers | local (spill) B | shared B | 16-byte loads | 16-byte stores |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, (name, switches) in KERNELS.items():
        for kind, dtype in ((0, "fp32"), (1, "bf16")):
            r = resources(compile_for_sm90(name, switches, kind)["cubin"])
            print(f"| {label} | {dtype} | {r['REG']} | {r['LOCAL']} | {r['SHARED']} | {r['LDG128']} | {r['STG128']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
