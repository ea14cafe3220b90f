"""Attention benchmark: mmalign's Triton kernel against SDPA (each backend forced) and xformers, on the shapes of
the models mmalign tunes, plus one end-to-end UNet training step. Results are printed and written as CSV and
JSON tagged with the device and library versions.

Entry points: ``run_attention_bench(...)`` and ``main(argv)`` (what ``mmalign bench attention`` calls).
On a machine without a CUDA GPU only ``--smoke`` runs (tiny shapes, SDPA, CPU timers), so the code stays tested.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from mmalign.kernels.dispatch import attention, available_backends


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call shape: (batch, heads, N_q, N_k, head dim), causal or not."""

    suite: str
    name: str
    batch: int
    heads: int
    n_q: int
    n_k: int
    head_dim: int
    causal: bool = False

    def flops(self, backward: bool) -> float:
        """Matmul FLOPs (QK^T and PV); the backward does 2.5x the forward's (five matmuls instead of two)."""
        forward = 4.0 * self.batch * self.heads * self.n_q * self.n_k * self.head_dim
        forward *= 0.5 if self.causal else 1.0
        return forward * (3.5 if backward else 1.0)


def _sd_unet(suite: str, heads: int, levels: Sequence[tuple[int, int]], batch: int) -> list[Case]:
    """Self- and cross-attention (77 text tokens) at each (head dim, latent tokens) level of an SD UNet."""
    cases = []
    for head_dim, tokens in levels:
        cases.append(Case(suite, f"self d{head_dim} N{tokens}", batch, heads, tokens, tokens, head_dim))
        cases.append(Case(suite, f"cross d{head_dim} {tokens}x77", batch, heads, tokens, 77, head_dim))
    return cases


def suites(batch: int = 2) -> dict[str, list[Case]]:
    """Benchmark shapes per model family (512px SD1.5, 1024px SDXL/SD3/Flux)."""
    return {
        "sd15": _sd_unet("sd15", 8, [(40, 4096), (80, 1024), (160, 256)], batch),
        "sdxl": [case for heads, tokens in ((10, 4096), (20, 1024)) for case in _sd_unet("sdxl", heads, [(64, tokens)], batch)],
        "sd3": [Case("sd3", "joint 24x64 N4429", batch, 24, 4429, 4429, 64)],
        "flux": [Case("flux", "joint 24x128 N4608", batch, 24, 4608, 4608, 128)],
        # AnimateDiff-style temporal attention: 16 frames, one sequence per latent pixel of a 64x64 latent.
        "video": [Case("video", "temporal 8x40 N16", batch * 64 * 64, 8, 16, 16, 40)],
        # Qwen2-VL vision tower: 16 heads of 80, 1024 patches per 448px image; its text decoder is causal.
        "qwen2vl": [Case("qwen2vl", "vision 16x80 N1024", 4 * batch, 16, 1024, 1024, 80),
                    Case("qwen2vl", "text causal 28x128 N2048", batch, 28, 2048, 2048, 128, causal=True)],
    }


SMOKE_CASES = [
    Case("smoke", "self d40 N64", 1, 2, 64, 64, 40),
    Case("smoke", "cross d80 64x77", 1, 2, 64, 77, 80),
    Case("smoke", "causal d16 N33", 1, 2, 33, 33, 16, causal=True),
]


Runner = tuple[str, Callable[[], AbstractContextManager]]


def _runners(device: torch.device, dtype: torch.dtype, wanted: Sequence[str] | None) -> dict[str, Runner]:
    """Backend label -> (``attention`` backend, context to run it in: forces one SDPA kernel where needed)."""
    found = available_backends(device, dtype)
    runners: dict[str, Runner] = {}
    if "triton" in found:
        runners["mmalign-triton"] = ("triton", nullcontext)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                            ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            runners[f"sdpa-{label}"] = ("sdpa", lambda kind=kind: sdpa_kernel(kind))
    else:
        runners["sdpa"] = ("sdpa", nullcontext)
    if "xformers" in found:
        runners["xformers"] = ("xformers", nullcontext)
    if wanted:
        unknown = set(wanted) - set(runners)
        if unknown:
            raise ValueError(f"backends: {sorted(unknown)} cannot run here; expected some of {sorted(runners)}")
        runners = {label: runners[label] for label in wanted}
    return runners


def _timer(device: torch.device, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn``: CUDA events on a GPU, perf_counter on a CPU."""

    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):  # the first calls also autotune and compile the Triton kernels
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    return measure


def _bench_case(case: Case, runners: dict[str, Runner], device, dtype, measure) -> list[dict]:
    def tensor(n: int) -> torch.Tensor:  # diffusers' layout: (B, N, H, D) viewed as (B, H, N, D)
        return torch.randn(case.batch, n, case.heads, case.head_dim, device=device, dtype=dtype).transpose(1, 2)

    q, k, v, dout = tensor(case.n_q), tensor(case.n_k), tensor(case.n_k), tensor(case.n_q)
    with torch.no_grad():
        baseline = attention(q, k, v, causal=case.causal, backend="sdpa").float()
    rows = []
    for label, (backend, context) in runners.items():
        row = {**dataclasses.asdict(case), "backend": label}
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward(backend=backend, context=context):
            with context(), torch.no_grad():
                return attention(q, k, v, causal=case.causal, backend=backend)

        def forward_backward(backend=backend, context=context, leaves=leaves):
            with context():
                out = attention(*leaves, causal=case.causal, backend=backend)
                return torch.autograd.grad(out, leaves, dout)

        try:
            row["max_abs_diff_vs_sdpa"] = (forward().float() - baseline).abs().max().item()
            for mode, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
                ms = measure(fn)
                row[f"{mode}_ms"] = ms
                row[f"{mode}_tflops"] = case.flops(mode == "fwd_bwd") / (ms * 1e-3) / 1e12
        except Exception as error:  # one failing backend (a forced SDPA kernel rejecting a shape, a kernel
            # that does not compile) is recorded in its row instead of ending the whole run
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
        rows.append(row)
    return rows


# With diffusers' other defaults this is the SD1.5 UNet (860M parameters, 32 attention layers) at 512 px.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
TINY_UNET = {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
             "attention_head_dim": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def _unet_step_ms(config: dict, backend: str | None, batch: int, device, dtype, measure) -> float:
    """One training step (forward, MSE loss, backward, AdamW) of a random-weight UNet; backend None = stock SDPA."""
    from diffusers import UNet2DConditionModel

    from mmalign.kernels.install import install

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).train()
    if backend is not None:
        install(unet, backend=backend)
    size, context = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=dtype)
    text = torch.randn(batch, 77, context, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step():
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text).sample, latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step)


def _environment(device: torch.device, dtype: torch.dtype) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if gpu else None,
        "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{name: version(name) for name in ("torch", "triton", "xformers", "diffusers", "mmalign")},
    }


@dataclasses.dataclass
class BenchResult:
    environment: dict
    rows: list[dict]
    end_to_end: list[dict]

    def table(self) -> str:
        """Plain-text table: one line per (case, backend), then the end-to-end steps."""
        env = self.environment
        lines = [f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']}",
                 f"{'case':<34}{'backend':<16}{'fwd TFLOP/s':>12}{'fwd+bwd TFLOP/s':>16}{'max|diff|':>11}"]
        for row in self.rows:
            case = f"{row['suite']} {row['name']}"
            if "error" in row:
                lines.append(f"{case:<34}{row['backend']:<16}  unsupported: {row['error'][:60]}")
                continue
            lines.append(f"{case:<34}{row['backend']:<16}{row['fwd_tflops']:>12.1f}{row['fwd_bwd_tflops']:>16.1f}"
                         f"{row['max_abs_diff_vs_sdpa']:>11.1e}")
        for row in self.end_to_end:
            lines.append(f"UNet train step {row['unet']:<18}{row['backend']:<16}{row['ms']:>12.1f} ms"
                         f"{row['speedup_vs_sdpa']:>14.2f}x")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``attention-<device>-<date>.{csv,json}``; returns both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = "".join(c if c.isalnum() else "-" for c in self.environment["device"]).strip("-").lower()
        stem = out_dir / f"attention-{tag}-{self.environment['date'][:19].replace(':', '')}"
        json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
        json_path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        columns = sorted({key for row in self.rows for key in row})
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*columns, *self.environment])
            writer.writeheader()
            writer.writerows({**row, **self.environment} for row in self.rows)
        return csv_path, json_path


def run_attention_bench(
    suite_names: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    batch: int = 2,
    end_to_end: bool = True,
    smoke: bool = False,
    warmup: int = 5,
    reps: int = 20,
    dtype: torch.dtype = torch.bfloat16,
) -> BenchResult:
    """Time every case of the chosen suites (all by default) with every available backend (or ``backends``).

    Needs a CUDA GPU unless ``smoke``, which runs three tiny cases and a tiny UNet step on the CPU in fp32.
    """
    if smoke:
        device, dtype, cases, unet_config = torch.device("cpu"), torch.float32, SMOKE_CASES, TINY_UNET
        backends = backends or ["sdpa"]
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("the attention benchmark needs a CUDA GPU; use --smoke to check it on a CPU")
        device, unet_config = torch.device("cuda"), SD15_UNET
        table = suites(batch)
        unknown = set(suite_names or ()) - set(table)
        if unknown:
            raise ValueError(f"suites: {sorted(unknown)} are unknown; expected some of {sorted(table)}")
        cases = [case for name in (suite_names or table) for case in table[name]]
    runners = _runners(device, dtype, backends)
    measure = _timer(device, warmup, reps)
    rows = [row for case in cases for row in _bench_case(case, runners, device, dtype, measure)]

    e2e = []
    if end_to_end:
        unet_name = "tiny" if smoke else "sd15-512px"
        kernel = "triton" if "mmalign-triton" in runners else "sdpa"
        stock_ms = _unet_step_ms(unet_config, None, batch, device, dtype, measure)
        ours_ms = _unet_step_ms(unet_config, kernel, batch, device, dtype, measure)
        e2e = [{"unet": unet_name, "backend": "stock-sdpa", "batch": batch, "ms": stock_ms, "speedup_vs_sdpa": 1.0},
               {"unet": unet_name, "backend": f"mmalign-{kernel}", "batch": batch, "ms": ours_ms,
                "speedup_vs_sdpa": stock_ms / ours_ms}]
    return BenchResult(_environment(device, dtype), rows, e2e)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, for ``mmalign bench attention`` and ``python -m mmalign.kernels.bench``."""
    parser.add_argument("--suite", action="append", choices=sorted(suites()), help="repeatable; default: all")
    parser.add_argument("--backend", action="append", help="repeatable label, e.g. mmalign-triton, sdpa-flash")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the image-model cases")
    parser.add_argument("--no-e2e", action="store_true", help="skip the UNet training-step comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the tooling")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="bench-results", help="folder for the CSV and JSON files")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe; print the table and write CSV/JSON."""
    try:
        result = run_attention_bench(args.suite, args.backend, args.batch, not args.no_e2e, args.smoke,
                                     args.warmup, args.reps)
    except (RuntimeError, ValueError) as error:
        print(f"mmalign bench attention: {error}", file=sys.stderr)
        return 2
    print(result.table())
    for path in result.save(args.out):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m mmalign.kernels.bench [--suite sd15 ...] [--backend ...] [--smoke] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="mmalign bench attention", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
