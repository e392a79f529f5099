"""Does a TORCH_CHECK failure inside sparsebert's CUDA ops come back as a Python RuntimeError?

    python3 benchmarks/diag_cxx_exceptions.py PATH_TO_C_SO

Loads the given build of the extension with torch.ops.load_library (nothing else of sparsebert) and
calls the CUDA forward op with invalid arguments. Prints "caught: ..." per case; a crash of this
process (exit code -11) means C++ exceptions do not cross from the extension into torch, which points
at a compiler / C++ runtime mismatch between the extension's build and torch's.
"""
import sys

import torch

torch.ops.load_library(sys.argv[1])
op = torch.ops.sparsebert_cuda.forward
dev = "cuda"
x = torch.randn(128, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn(4, 64, 64, device=dev, dtype=torch.bfloat16)
index = torch.zeros(3 + 3 + 16, dtype=torch.int32, device=dev)
cases = {
    "bad variant": lambda: op(x, v, None, index, 128, 128, 64, 64, 99),
    "cpu x": lambda: op(x.cpu(), v, None, index, 128, 128, 64, 64, -1),
    "bad block": lambda: op(x, v, None, index, 128, 128, 16, 16, -1),
}
for name, fn in cases.items():
    try:
        fn()
        print(f"{name}: no error raised (unexpected)", flush=True)
    except RuntimeError as e:
        print(f"{name}: caught: {str(e).splitlines()[0][:100]}", flush=True)
