"""Fits the GELU epilogue's piecewise erf tables (csrc/cpu/bsr_cpu_kernels_impl.h, ``gt_coef``) and
prints one as C++: AVX-512 (16 pieces, degree 5) and AVX2 (8 pieces, degree 7), one piece per
vector lane.

E(a) = erf(a / sqrt 2) for a = |x| >= 0 is cut into P pieces by k = round(a * scale): pieces
0..P-2 are polynomials in t = a * scale - k (|t| <= 1/2), piece P-1 is exactly 1 (a >= (P - 1.5) /
scale = 5.7, where 1 - E < 1.2e-8: GELU is then x or 0 exactly). The kernel picks each lane's
coefficients with one vpermps per coefficient. Each piece: near-minimax (Lawson-reweighted least
squares on Chebyshev nodes, float64), then the constant term rounded to float32 and the rest refitted
around it, then rounded. Prints the worst absolute error of the float32 table (evaluated in float64).

    python benchmarks/gelu_table_fit.py [degree] [L] [pieces]     # 5 5.7 16 (AVX-512), 7 5.7 8 (AVX2)
"""
import sys
from math import erf, sqrt

import numpy as np

def fit(deg=5, L=5.7, PIECES=16):
    scale = np.float32((PIECES - 1.5) / L)
    E = np.vectorize(lambda a: erf(a / sqrt(2)))
    coef = np.zeros((PIECES, deg + 1))
    worst = 0.0
    lo, hi = -0.5 - 1e-3, 0.5 + 1e-3   # a little past +-1/2: ties of the rounding go either way
    n = 400
    tt = np.cos(np.pi * (np.arange(n) + 0.5) / n) * (hi - lo) / 2 + (hi + lo) / 2
    V = np.vander(tt, deg + 1, increasing=True)
    tf = np.linspace(lo, hi, 20001)
    Vf = np.vander(tf, deg + 1, increasing=True)
    for k in range(PIECES - 1):
        y = E((k + tt) / float(scale))
        w = np.ones(n)
        for _ in range(200):   # Lawson: weights grow where the error is large -> minimax
            c, *_ = np.linalg.lstsq(V * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)
            w = w * (np.abs(V @ c - y) + 1e-30)
            w /= w.sum()
        c32 = np.zeros(deg + 1)
        c32[0] = np.float32(c[0])
        rest, *_ = np.linalg.lstsq(V[:, 1:], y - c32[0], rcond=None)
        c32[1:] = rest.astype(np.float32)
        coef[k] = c32
        worst = max(worst, float(np.max(np.abs(Vf @ c32 - E((k + tf) / float(scale))))))
    coef[PIECES - 1, 0] = 1.0
    return scale, coef, worst


def main():
    deg = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    L = float(sys.argv[2]) if len(sys.argv) > 2 else 5.7
    PIECES = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    scale, coef, worst = fit(deg, L, PIECES)
    print(f"// benchmarks/gelu_table_fit.py {deg} {L} {PIECES}: worst |table - erf(a / sqrt 2)| = {worst:.2e}")
    print(f"constexpr float kGeluScale = {scale:.9e}f;")
    print(f"constexpr float kGeluClamp = {np.float32((PIECES - 1) / scale):.9e}f;  // the last piece (E = 1) from here on")
    print(f"constexpr int kGeluDeg = {deg};")
    print(f"alignas(64) const float gt_coef[{deg + 1}][{PIECES}] = {{  // [power of t][piece]")
    for j in range(deg + 1):
        print("    {" + ", ".join(f"{np.float32(coef[k, j]):.9e}f" for k in range(PIECES)) + "},")
    print("};")


if __name__ == "__main__":
    main()
