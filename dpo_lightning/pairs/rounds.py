"""The round-by-round record of ``iterate``: ``rounds.json``, TensorBoard scalars under ``round/``, a plot of the
figures against the round (``rounds.png``, also logged to TensorBoard as an image), and each round's line in the log.

One record per round; round 0 is the initial model (its held-out evaluation only). The figures plotted are the
samples' reward (mean, min, max), the share of prompts that gave a pair, the held-out reward, the DPO metrics of
the round's ``fit`` and its generation probes when configured.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont  # a tensorboard dependency

from ..atomic import atomic_open


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The figures of one round record, by TensorBoard tag."""
    out: dict[str, float] = {}
    samples = record.get("samples") or {}
    for key in ("reward_mean", "reward_min", "reward_max"):
        if key in samples:
            out[f"round/samples/{key}"] = samples[key]
    for name, value in (samples.get("terms") or {}).items():
        out[f"round/samples/terms/{name}"] = value
    if "usable_share" in record:
        out["round/usable_share"] = record["usable_share"]
        out["round/pairs"] = float(record["pairs"])
    if "train_pairs" in record:
        out["round/train_pairs"] = float(record["train_pairs"])
    for key, value in (record.get("eval") or {}).items():
        if isinstance(value, (int, float)):
            out[f"round/eval/{key}"] = float(value)
    for tag, value in (record.get("fit") or {}).items():
        out[f"round/fit/{tag}"] = value
    return out


def write_record(output_dir: str, records: list[dict[str, Any]]) -> None:
    """Write ``rounds.json``, the plot and the TensorBoard record (rewritten whole, so a resumed run logs each round
    once)."""
    with atomic_open(os.path.join(output_dir, "rounds.json"), encoding="utf-8") as f:
        json.dump(records, f, indent=2, ensure_ascii=False)
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in round_scalars(record).items():
            series.setdefault(tag, []).append((record["round"], value))
    image = plot_rounds(series)
    image.save(os.path.join(output_dir, "rounds.png"))
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = os.path.join(output_dir, "record")
    shutil.rmtree(tb_dir, ignore_errors=True)
    writer = SummaryWriter(tb_dir)
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    if records:
        writer.add_image("round/plot", np.asarray(image), records[-1]["round"], dataformats="HWC")
    writer.close()


PANELS = (  # (title, tags drawn in it)
    ("reward of the samples (mean, min, max)", ("round/samples/reward_mean", "round/samples/reward_min",
                                                "round/samples/reward_max")),
    ("held-out reward (greedy)", ("round/eval/reward_mean",)),
    ("held-out reward terms (mean)", ("round/eval/*_mean",)),
    ("prompts that gave a pair", ("round/usable_share",)),
    ("DPO reward accuracy (train, last epoch)", ("round/fit/train/rewards/accuracies",)),
    ("probes: name rate", ("round/fit/val/probes/name_rate",)),
    ("degenerate share (held-out, probes)", ("round/eval/degenerate_rate", "round/fit/val/probes/degenerate_rate")),
)
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def plot_rounds(series: dict[str, list[tuple[int, float]]], width: int = 360, height: int = 220) -> Image.Image:
    """Small multiples, one panel per figure present, each with its own y range; x is the round."""
    def present(pattern: str) -> list[str]:  # "*" stands for any one tag part
        head, star, tail = pattern.partition("*")
        if not star:
            return [pattern] if pattern in series else []
        return sorted(t for t in series if t.startswith(head) and t.endswith(tail) and "/" not in t[len(head):]
                      and t != "round/eval/reward_mean")

    panels = [(title, [t for pattern in tags for t in present(pattern)]) for title, tags in PANELS]
    panels = [(title, tags) for title, tags in panels if tags] or [("no figures yet", [])]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * width, rows * height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for n, (title, tags) in enumerate(panels):
        x0, y0 = (n % columns) * width, (n // columns) * height
        _panel(draw, font, (x0 + 44, y0 + 24, x0 + width - 12, y0 + height - 28), title, [series[t] for t in tags],
               [t.rpartition("/")[2].removesuffix("_mean") for t in tags])
    return image


def _panel(draw: ImageDraw.ImageDraw, font: Any, box: tuple[int, int, int, int], title: str,
           lines: list[list[tuple[int, float]]], labels: list[str]) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 18), title, fill="black", font=font)
    draw.rectangle(box, outline=(160, 160, 160))
    lines = [[p for p in line if math.isfinite(p[1])] for line in lines]  # a NaN figure is left out, not drawn
    points = [p for line in lines for p in line]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.08 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for value in (y_lo + pad, y_hi - pad):
        draw.text((left - 42, at(x_lo, value)[1] - 6), f"{value:.3g}", fill=(90, 90, 90), font=font)
    for x in range(int(x_lo), int(x_hi) + 1):
        draw.text((at(x, y_lo)[0] - 3, bottom + 4), str(x), fill=(90, 90, 90), font=font)
    legend_x = left + 4
    for k, (line, label) in enumerate(zip(lines, labels)):
        colour = COLOURS[k % len(COLOURS)]
        coords = [at(x, y) for x, y in sorted(line)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        if len(lines) > 1:
            draw.text((legend_x, top + 2), label, fill=colour, font=font)
            legend_x += draw.textlength(label, font=font) + 12


def read_json(path: str) -> Optional[Any]:
    """The JSON at ``path``, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def print_round(record: dict[str, Any]) -> None:
    """One line for the log: the round's sample rewards, pairs, held-out reward and probes."""
    parts = [f"round {record['round']}"]
    if "samples" in record:
        s = record["samples"]
        parts.append(f"samples reward {s['reward_mean']:.3f} [{s['reward_min']:.3g}, {s['reward_max']:.3g}]")
        parts.append(f"{record['pairs']} pairs from {record['prompts']} prompts ({record['usable_share']:.0%})")
        if record.get("train_pairs", record["pairs"]) != record["pairs"]:
            parts.append(f"trained on {record['train_pairs']} pairs")
        if greedy := record.get("greedy"):
            parts.append(f"greedy answer chosen {greedy['greedy_chosen']}, rejected {greedy['greedy_rejected']}")
    if record.get("eval"):
        parts.append(f"held-out reward {record['eval']['reward_mean']:.3f}")
    for tag in ("val/probes/name_rate", "val/probes/degenerate_rate"):
        if tag in (record.get("fit") or {}):
            parts.append(f"{tag.rpartition('/')[2]} {record['fit'][tag]:.3f}")
    print("[dpo_lightning] " + " | ".join(parts), flush=True)
