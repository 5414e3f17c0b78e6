"""Formats bench/out/*.jsonl (written by bench/run.sh) as bench/RESULTS.md."""
import datetime
import json
import os
import platform
import subprocess
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        blas = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libopenblas0-pthread"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        blas = "?"
    import torch
    return (f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}; OpenBLAS {blas} (pthread); PyTorch {torch.__version__} (Debian)")


MARK = "<!-- lm-comparison -->"


def main():
    out, command = sys.argv[1], sys.argv[2]
    # bench/lm_report.py owns the section after MARK; keep it
    kept = ""
    if os.path.exists("bench/RESULTS.md"):
        text = open("bench/RESULTS.md").read()
        if MARK in text:
            kept = MARK + text.split(MARK, 1)[1]
    sgemm = {r["core"]: r for r in load(os.path.join(out, "sgemm.jsonl"))}
    moe = {(r["core"], r["shape"], r["pass"]): r for r in load(os.path.join(out, "moe.jsonl"))}
    torch = {(r["core"], r["shape"], r["pass"]): r for r in load(os.path.join(out, "torch.jsonl"))}
    rpath = os.path.join(out, "router.jsonl")
    routers = load(rpath) if os.path.exists(rpath) else []
    tpath = os.path.join(out, "train.jsonl")
    trains = load(tpath) if os.path.exists(tpath) else []
    print("# Benchmarks\n")
    print(f"- Date: {datetime.date.today().isoformat()}")
    print(f"- Machine: {machine()}")
    print(f"- Command: `{command}` (bench/run.sh; medians of the timed repetitions)")
    print("- Layer: SwiGLU experts, softmax top-k renormalised (Mixtral block); GFLOP/s on active expert")
    print("  FLOPs (2·N·K·3·C·F forward, 3× for forward+backward). Peer: bench/peer_torch.py, the Hugging")
    print("  Face MixtralSparseMoeBlock loop in PyTorch, same shapes, threads and OpenBLAS kernel.")
    print("- Ceiling: OpenBLAS's own threaded sgemm 2048³ in the same run (`moe bench sgemm`).")
    print("- Training: `moe bench train` vs `bench/peer_train_torch.py` (tools/model_twin.py, the Hugging Face")
    print("  style Mixtral twin of the C model) on random tokens, the `small` preset (`moe info --preset small --print-config`).\n")
    for core, s in sgemm.items():
        ceil = s["gflops"]
        print(f"## OpenBLAS kernel `{core}`: sgemm ceiling {ceil:.1f} GFLOP/s ({s['threads']} threads)\n")
        print("| shape | pass | moe ms | torch ms | speed-up | moe GFLOP/s | % of sgemm |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for (c, shape, p), r in moe.items():
            if c != core:
                continue
            t = torch.get((c, shape, p))
            tms = f"{t['ms']:.1f}" if t else "–"
            ratio = f"{t['ms'] / r['ms']:.2f}×" if t else "–"
            print(f"| {shape} | {p} | {r['ms']:.1f} | {tms} | {ratio} | {r['gflops']:.1f} | "
                  f"{100 * r['gflops'] / ceil:.0f}% |")
        e8, e512 = moe.get((core, "S3-e8", "fwd")), moe.get((core, "S3-e512", "fwd"))
        t8, t512 = torch.get((core, "S3-e8", "fwd")), torch.get((core, "S3-e512", "fwd"))
        rr = [r for r in routers if r.get("core") == core]
        if rr:
            parts = [f"`{r['router']}` {100 * r['route_share']:.1f}% of {r['ms']:.1f} ms"
                     + (f", {100 * r['dropped']:.1f}% of pairs dropped" if r['dropped'] > 0 else "") for r in rr]
            print("\nRouting overhead on S1 forward (router + dispatch + combine, excluding the expert GEMMs; "
                  "`moe bench layer --shape S1 --router NAME`): " + "; ".join(parts) + ".")
        tr = [r for r in trains if r.get("core") == core]
        tm = next((r for r in tr if r["impl"] == "moe"), None)
        tt = next((r for r in tr if r["impl"] == "torch"), None)
        if tm and tt:
            print(f"\nTraining the `small` preset ({tm['params'] / 1e6:.1f}M parameters, 8 experts top-2), batch "
                  f"{tm['batch']}×{tm['seq']}, {tm['threads']} threads, forward + backward + AdamW: moe "
                  f"{tm['tokens_per_s']:.0f} tokens/s ({tm['ms_per_step']:.0f} ms/step, peak RSS "
                  f"{tm['peak_rss_mb']:.0f} MB), PyTorch twin {tt['tokens_per_s']:.0f} tokens/s "
                  f"({tt['ms_per_step']:.0f} ms/step, peak RSS {tt['peak_rss_mb']:.0f} MB): "
                  f"**{tm['tokens_per_s'] / tt['tokens_per_s']:.2f}×**.")
        if e8 and e512:
            line = f"\nCost in the number of experts: S3-e512 / S3-e8 forward = {e512['ms'] / e8['ms']:.2f}× (moe)"
            if t8 and t512:
                line += f", {t512['ms'] / t8['ms']:.1f}× (torch)"
            print(line + ".\n")
    if kept:
        print(kept.rstrip("\n"))


if __name__ == "__main__":
    main()
