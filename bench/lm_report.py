"""Writes the LM comparison section of bench/RESULTS.md from bench/out/lm (bench/lm_compare.sh)."""
import datetime
import json
import math
import os
import re
import subprocess
import sys

MARK = "<!-- lm-comparison -->"
# sections measured by hand (experiments, crash safety, fuzzing) follow END; both scripts keep them
END = "<!-- end lm-comparison -->"


def run_stats(out, name):
    st = json.load(open(os.path.join(out, name, "train_state.json")))
    card = json.loads(subprocess.run(["./build/moe", "info", "-m", os.path.join(out, name), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    log = open(os.path.join(out, name + ".log")).read()
    err = open(os.path.join(out, name + ".err")).read()
    tps = re.search(r"\(([0-9.]+) tokens/s\)", log)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return st, card, float(tps.group(1)) if tps else float("nan"), int(rss.group(1)) / 1024 if rss else float("nan")


def main():
    out, command = sys.argv[1], sys.argv[2]
    rows, curves = [], {}
    for name in ("small", "small-dense"):
        st, card, tps, rss = run_stats(out, name)
        val = st["val"]
        curves[name] = {int(s): v for s, v in val}
        rows.append((name, card, st, tps, rss, val[-1][1]))
    lines = [MARK, "## Language model: MoE vs dense at equal active parameters", "",
             f"- Date: {datetime.date.today().isoformat()}; command: `{command}` (bench/lm_compare.sh); curves:",
             "  [lm_compare.svg](lm_compare.svg). Same seed, data order, schedule (warm-up 5%, cosine) and tokens.",
             "- Peak memory is the maximum resident set size of `moe train` (`/usr/bin/time -v`).", "",
             "| model | total params | active params | tokens | train tokens/s | peak RSS | val loss | val ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, card, st, tps, rss, vl in rows:
        lines.append(f"| {name} | {card['total_params'] / 1e6:.2f}M | {card['active_params'] / 1e6:.2f}M | "
                     f"{st['tokens'] / 1e6:.2f}M | {tps:.0f} | {rss:.0f} MB | {vl:.4f} | {math.exp(vl):.1f} |")
    steps = sorted(set(curves["small"]) & set(curves["small-dense"]))
    lines += ["", "Validation loss along the way (nats/token):", "",
              "| step | " + " | ".join(str(s) for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
    for name in ("small", "small-dense"):
        lines.append(f"| {name} | " + " | ".join(f"{curves[name][s]:.3f}" for s in steps) + " |")
    section = "\n".join(lines) + "\n"
    path = "bench/RESULTS.md"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    tail = END + text.split(END, 1)[1] if END in text else END + "\n"
    text = text.split(MARK)[0].rstrip("\n") + "\n\n" + section + "\n" + tail
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
