"""GPU kernel check to run when a GPU machine is lent (never collected by the CPU suite).

    python tests/gpu/kernels_gpu.py [--out DIR]      # needs a CUDA GPU and triton
    python tests/gpu/kernels_gpu.py --smoke          # CPU, Triton interpreter, tiny shapes: checks the script

For every kernel (compiled by Triton, bf16, Llama-8B-like shapes):
1. correctness against its pure-torch reference (relative error <= 1e-2, outputs and gradients);
2. achieved bandwidth of the forward and backward kernels (minimal bytes each must read and write,
   divided by its median time) against a device-to-device copy moving the same number of bytes
   (target >= 80% for the memory-bound ones: rmsnorm, swiglu, rotary);
3. time of forward + backward against the torch reference run eagerly and under torch.compile.
The fused linear + cross-entropy is also compared with the unfused logits path (time and peak memory).
Prints one table; writes gpu_kernels.json to --out.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests/gpu/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))  # megatron_swift_kernels

from megatron_swift_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_swift_kernels.fused_linear_cross_entropy.autograd import CHUNK_ELEMENTS
from megatron_swift_kernels.fused_linear_cross_entropy.reference import linear_cross_entropy
from megatron_swift_kernels.rmsnorm import rms_norm
from megatron_swift_kernels.rmsnorm.reference import rms_norm as rms_norm_reference
from megatron_swift_kernels.rotary import apply_rotary
from megatron_swift_kernels.rotary import reference as rotary_reference
from megatron_swift_kernels.swiglu import swiglu
from megatron_swift_kernels.swiglu.reference import swiglu as swiglu_reference
from tests.gpu.common import device_for, environment, parser, write_result

FULL = {"tokens": 8192, "hidden": 4096, "ffn": 14336, "heads": 32, "head_dim": 128, "batch": 2,
        "ce_tokens": 4096, "ce_hidden": 1024, "vocab": 151936}  # fmt: skip
SMOKE = {"tokens": 8, "hidden": 32, "ffn": 48, "heads": 2, "head_dim": 16, "batch": 2,
         "ce_tokens": 16, "ce_hidden": 16, "vocab": 96}  # fmt: skip
BANDWIDTH_TARGET = 0.8


def bench_ms(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def copy_ms(nbytes: int, device: str) -> float:
    """A device-to-device copy moving `nbytes` in total (half read, half written): nbytes / 2 one-byte elements."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), device)


def relative_error(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def fwd_bwd(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad)]


def check_and_time(name, triton_fn, reference_fn, inputs, grad, kernels, device, compile_reference: bool) -> dict:
    """kernels: [(label, launcher thunk, bytes moved)] of the raw forward/backward Triton kernels."""
    errors = [relative_error(a, b) for a, b in zip(fwd_bwd(triton_fn, inputs, grad),
                                                    fwd_bwd(reference_fn, inputs, grad), strict=True)]  # fmt: skip
    row = {"op": name, "max_rel_error": max(errors), "correct": max(errors) <= 1e-2, "kernels": []}
    for label, launch, nbytes in kernels:
        row["kernels"].append(label)
        ms = bench_ms(launch, device)
        copy = copy_ms(nbytes, device)
        row[f"{label}_ms"] = ms
        row[f"{label}_GBps"] = nbytes / ms / 1e6
        row[f"{label}_vs_copy"] = copy / ms  # = achieved bandwidth / copy bandwidth
    row["triton_fwd_bwd_ms"] = bench_ms(lambda: fwd_bwd(triton_fn, inputs, grad), device)
    row["eager_fwd_bwd_ms"] = bench_ms(lambda: fwd_bwd(reference_fn, inputs, grad), device)
    if compile_reference:
        compiled = torch.compile(reference_fn)
        fwd_bwd(compiled, inputs, grad)  # compile outside the timing
        row["compiled_fwd_bwd_ms"] = bench_ms(lambda: fwd_bwd(compiled, inputs, grad), device)
    return row


def run(shape: dict, device: str, compile_reference: bool) -> list[dict]:
    from megatron_swift_kernels.fused_linear_cross_entropy import triton_impl as ce_kernels
    from megatron_swift_kernels.rmsnorm.triton_impl import rmsnorm_backward, rmsnorm_forward
    from megatron_swift_kernels.rotary.triton_impl import rotary_apply
    from megatron_swift_kernels.swiglu.triton_impl import swiglu_backward, swiglu_forward

    dtype, gen = torch.bfloat16, torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    n, h, f = shape["tokens"], shape["hidden"], shape["ffn"]
    rows = []

    x, w, dy = randn(n, h), randn(h, scale=0.1) + 1, randn(n, h)
    _, rstd = rmsnorm_forward(x, w, 1e-6)
    rows.append(check_and_time(
        "rmsnorm", lambda a, b: rms_norm(a, b, 1e-6, "triton"), lambda a, b: rms_norm_reference(a, b, 1e-6),
        [x, w], dy,
        [("fwd", lambda: rmsnorm_forward(x, w, 1e-6), 2 * n * h * 2),
         ("bwd", lambda: rmsnorm_backward(dy, x, w, rstd), 3 * n * h * 2)],
        device, compile_reference))  # fmt: skip

    fc1, dy = randn(n, 2 * f), randn(n, f)
    rows.append(check_and_time(
        "swiglu", lambda a: swiglu(a, "triton"), swiglu_reference, [fc1], dy,
        [("fwd", lambda: swiglu_forward(fc1), 3 * n * f * 2), ("bwd", lambda: swiglu_backward(fc1, dy), 5 * n * f * 2)],
        device, compile_reference))  # fmt: skip

    b, heads, d = shape["batch"], shape["heads"], shape["head_dim"]
    s = n // b
    t, dy = randn(s, b, heads, d), randn(s, b, heads, d)
    freqs = torch.randn(s, 1, 1, d, generator=gen, device=device)
    cos, sin = (table.contiguous() for table in rotary_reference.rotary_tables(freqs, dtype))
    positions = torch.arange(s, device=device, dtype=torch.int32).repeat_interleave(b)
    flat, flat_dy = t.reshape(n, heads, d), dy.reshape(n, heads, d)
    rows.append(check_and_time(
        "rotary", lambda a: apply_rotary(a, freqs, backend="triton"), lambda a: rotary_reference.apply_rotary(a, freqs),
        [t], dy,
        [("fwd", lambda: rotary_apply(flat, cos, sin, positions), 2 * n * heads * d * 2),
         ("bwd", lambda: rotary_apply(flat_dy, cos, sin, positions, backward=True), 2 * n * heads * d * 2)],
        device, compile_reference))  # fmt: skip

    ce_n, ce_h, vocab = shape["ce_tokens"], shape["ce_hidden"], shape["vocab"]
    hid, weight = randn(ce_n, ce_h), randn(vocab, ce_h, scale=0.02)
    labels = torch.randint(0, vocab, (ce_n,), generator=gen, device=device)
    mask = torch.ones(ce_n, device=device)
    columns = min(vocab, max(1, CHUNK_ELEMENTS // ce_n))  # one vocabulary chunk: [tokens, columns] logits
    logits = torch.randn(ce_n, columns, generator=gen, device=device)
    hit = labels % columns
    stats = ce_kernels.chunk_stats(logits, hit)
    lse = stats[0] + stats[1].log()

    def fused(a, b):
        return fused_linear_cross_entropy(a, b, labels, mask, backend="triton")

    def unfused(a, b):
        return linear_cross_entropy(a, b, labels, mask)

    row = check_and_time(
        "fused_linear_cross_entropy", fused, unfused, [hid, weight], torch.tensor(1.0, device=device),
        [("ce_stats", lambda: ce_kernels.chunk_stats(logits, hit), ce_n * columns * 4),
         ("ce_grad", lambda: ce_kernels.chunk_grad_(logits, hit, lse, mask), 2 * ce_n * columns * 4)],
        device, compile_reference)  # fmt: skip
    if device == "cuda":
        for label, fn in (("fused", fused), ("unfused", unfused)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd(fn, [hid, weight], torch.tensor(1.0, device=device))
            torch.cuda.synchronize()
            row[f"{label}_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op | rel. error | kernel | ms | GB/s | vs copy | fwd+bwd ms: triton / eager / compile |",
             "|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        timing = " / ".join(f"{row[k]:.3f}" for k in ("triton_fwd_bwd_ms", "eager_fwd_bwd_ms", "compiled_fwd_bwd_ms")
                            if k in row)  # fmt: skip
        for i, label in enumerate(row["kernels"]):
            lines.append(f"| {row['op'] if i == 0 else ''} | {row['max_rel_error']:.1e} | {label} | "
                         f"{row[label + '_ms']:.3f} | {row[label + '_GBps']:.0f} | {row[label + '_vs_copy']:.2f} | "
                         f"{timing if i == 0 else ''} |")  # fmt: skip
    for r in (r for r in rows if "fused_peak_extra_MiB" in r):
        fused, unfused = r["fused_peak_extra_MiB"], r["unfused_peak_extra_MiB"]
        lines.append(
            f"\nfused linear+CE peak extra {fused:.0f} MiB vs unfused {unfused:.0f} MiB ({fused / unfused:.1%})"
        )
    return "\n".join(lines)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = cli.parse_args()
    device = device_for("tests/gpu/kernels_gpu.py", args.smoke)
    rows = run(SMOKE if args.smoke else FULL, device.type, compile_reference=not (args.smoke or args.no_compile))
    print(table(rows))
    memory_bound = [r for r in rows if r["op"] in ("rmsnorm", "swiglu", "rotary")]
    summary = {
        **environment(device),
        "rows": rows,
        "all_correct": all(r["correct"] for r in rows),
        "memory_bound_meet_bandwidth_target": all(
            r[key] >= BANDWIDTH_TARGET for r in memory_bound for key in r if key.endswith("_vs_copy")
        ),
    }
    write_result(args.out, "gpu_kernels.json", summary)
    if not summary["all_correct"]:
        raise SystemExit("a kernel differs from its reference (see the table)")


if __name__ == "__main__":
    main()
