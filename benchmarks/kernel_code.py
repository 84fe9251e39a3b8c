"""The Triton row kernels' compiled code for an H100, read on any machine, GPU or not.

Each kernel (vlm_rlaif.kernels) is compiled for compute capability 9.0 with its launch
settings, and its machine code is read back with the cuobjdump that ships with Triton:
registers, shared and spilled memory of a program, programs resident on one SM, and the
instructions its main loop spends on each logit. A row kernel streams logits from HBM; the
H100's issue rate divided by those instructions caps the logits it can process a second, and
the figure printed is that cap as a share of HBM bandwidth. Below 1 the kernel cannot reach
the memory's speed whatever the launch; well above 1 it is free to be memory-bound, which
only a GPU measures (benchmarks/logprobs.py).

    python benchmarks/kernel_code.py [--dtype bfloat16 float32]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from vlm_rlaif import kernels

# H100 SXM5: SMs, warp instructions issued a cycle per SM, boost clock, HBM3 bandwidth, and what one SM holds
SMS, ISSUE, CLOCK, HBM = 132, 4, 1.98e9, 3.35e12
SM_REGISTERS, SM_WARPS, SM_SHARED, SM_PROGRAMS = 65536, 64, 228 * 1024, 32
LOGITS_MOVED = {"row_stats": 1, "logit_grads_": 2}  # the forward reads a logit; the backward reads and writes it
SETTINGS = {"row_stats": kernels.ROW_STATS, "logit_grads_": kernels.LOGIT_GRADS}


def machine_code(cubin: bytes) -> tuple[dict[str, int], list[str]]:
    """(resource usage, SASS instruction lines) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    resources = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    return resources, [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]


def main_loop_length(instructions: list[str]) -> int:
    """Instructions of the longest loop: the widest jump back."""
    spans = []
    for line in instructions:
        jump = re.search(r"\bBRA (0x[0-9a-f]+)", line)
        here = int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16)
        if jump and int(jump.group(1), 16) < here:
            spans.append((here - int(jump.group(1), 16)) // 16 + 1)  # every instruction is 16 bytes
    return max(spans, default=0)


def resident_programs(registers: int, shared: int, warps: int) -> int:
    by_registers = SM_REGISTERS // (-(-registers // 8) * 8 * 32 * warps)  # registers are granted in eights a thread
    return min(by_registers, SM_WARPS // warps, SM_SHARED // max(shared, 1), SM_PROGRAMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, compiled for compute capability 9.0; H100 SXM5: {SMS} SMs at {CLOCK / 1e9:.2f} GHz, "
          f"HBM {HBM / 1e12:.2f} TB/s")
    for name in args.dtype:
        dtype = getattr(torch, name)
        for kernel, compiled in kernels.ahead_of_time(dtype).items():
            settings = SETTINGS[kernel]
            resources, instructions = machine_code(compiled.asm["cubin"])
            per_logit = main_loop_length(instructions) / (settings["BLOCK"] / (32 * settings["num_warps"]))
            logits_per_second = SMS * ISSUE * 32 * CLOCK / per_logit
            ceiling = logits_per_second * LOGITS_MOVED[kernel] * dtype.itemsize / HBM
            programs = resident_programs(resources["REG"], compiled.metadata.shared, settings["num_warps"])
            print(f"  {kernel:13s} {name:9s} {resources['REG']:3d} registers, {compiled.metadata.shared / 1024:4.0f} KiB shared, "
                  f"{resources['LOCAL']} B spilled, {programs:2d} programs an SM; main loop {per_logit:5.2f} instructions a logit, "
                  f"issue cap {ceiling:.2f}x HBM bandwidth")


if __name__ == "__main__":
    main()
