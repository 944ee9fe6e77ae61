"""Compile Smooth-AP's Triton kernels for a GPU architecture without one, and read ptxas's register report.

Triton ships ptxas, so the kernels compile for sm_90 (H100/H200) on any machine; ptxas -v states each
kernel's stack frame and spill stores/loads. A spill moves registers to local memory, which is slow, so
`python -m bench.benchmarks.triton_spills` checks every chunk size `losses._smooth_ap_triton._blocks` can
choose. Run it without TRITON_INTERPRET: under the interpreter `triton.jit` gives no compilable function.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

REPORT = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
POINTERS = {
    "forward": ["sims", "queries", "positives", "numer", "denom", "inv_temperature"],
    "backward": ["sims", "grad", "queries", "positives", "item_coef", "positive_coef", "inv_temperature"],
}


def chunk_sizes() -> list[int]:
    """Every BLOCK_P the launcher can choose: powers of two from 2 up to the chunk size."""
    from losses._smooth_ap_triton import _blocks

    return sorted({_blocks(positives)[0] for positives in range(1, 4 * 64 + 1)})


def compile_report(kernel: str, block_p: int, include_self: bool, capability: int = 90) -> dict:
    """Stack frame and spill bytes of one kernel compiled for sm_<capability> in fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    import losses._smooth_ap_triton as kernels

    fn = kernels._forward_kernel if kernel == "forward" else kernels._backward_kernel
    signature = {
        f"{name}_ptr": "*i64" if name in ("queries", "positives") else "*fp32" for name in POINTERS[kernel]
    }
    signature |= {name: "i32" for name in ("row_stride", "columns", "num_positives", "query_offset")}
    signature |= {name: "constexpr" for name in ("INCLUDE_SELF", "BLOCK_P", "BLOCK_J")}
    block_j = kernels._blocks(block_p)[1]
    constants = {"INCLUDE_SELF": include_self, "BLOCK_P": block_p, "BLOCK_J": block_j}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = f"--gpu-name=sm_{capability}a" if capability == 90 else f"--gpu-name=sm_{capability}"
        command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", arch, str(ptx), "-o", f"{ptx}.o"]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    match = REPORT.search(log)
    if match is None:
        raise RuntimeError(f"ptxas -v printed no register report for {kernel} BLOCK_P={block_p}:\n{log}")
    stack, stores, loads = map(int, match.groups())
    registers = re.search(r"Used (\d+) registers", log)
    return {
        "kernel": kernel,
        "block_p": block_p,
        "block_j": block_j,
        "include_self": include_self,
        "stack_bytes": stack,
        "spill_stores": stores,
        "spill_loads": loads,
        "registers": int(registers.group(1)) if registers else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability (90: H100/H200)")
    args = parser.parse_args()
    rows = [
        compile_report(kernel, block_p, include_self, args.capability)
        for kernel in ("forward", "backward")
        for block_p in chunk_sizes()
        for include_self in (False, True)
    ]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
