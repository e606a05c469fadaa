"""What guidance costs: the shipped generator and classifier at 64x64x17, 20 steps, CFG 5, unguided and
guided at the `GuidanceConfig` defaults, clip by clip in turn in one process (same prompts, same seeds).

    python benchmarks/guided_cost.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics

from shipped import MODELS, dev_clips, parser, timed

from cvg.measure import machine_line, publish
from cvg.pipeline import CVGPipeline


def main() -> None:
    args = parser(__doc__, clips=8).parse_args()
    pipe = CVGPipeline.from_pretrained(MODELS / "compshapes-wan")
    pipe.load_classifier(MODELS / "compshapes-classifier")
    pipe.pipe.set_progress_bar_config(disable=True)
    seconds: dict[str, list[float]] = {"unguided": [], "guided": []}
    phases: list[dict] = []
    for i, clip in dev_clips(args.clips):
        for name, guide_steps in (("unguided", 0), ("guided", None)):
            elapsed, out = timed(pipe, clip, i, guide_steps=guide_steps)
            if i:
                seconds[name].append(elapsed)
                if name == "guided":
                    phases.append(out.timings)
    unguided, guided = (statistics.median(seconds[n]) for n in ("unguided", "guided"))
    guided_steps = statistics.median(p["guided_steps"] for p in phases)
    config = pipe.guidance
    lines = [
        f"Guided against unguided generation, {machine_line()}: the shipped generator and classifier, "
        f"64x64x17, 20 steps, CFG 5; guided = the defaults ({config.guide_steps} steps, {config.iterations} "
        f"update each, normalize {config.normalize}); medians of {args.clips} held-out prompts, each "
        "variant in turn.",
        "",
        "| variant | s per clip | guided steps (s) | / unguided |",
        "|---|---|---|---|",
        f"| unguided | {unguided:.2f} | - | 1.00 |",
        f"| guided (defaults) | {guided:.2f} | {guided_steps:.2f} | {guided / unguided:.2f} |",
    ]
    publish("Command: `python benchmarks/guided_cost.py`\n\n" + "\n".join(lines), args.write, "guided_cost")


if __name__ == "__main__":
    main()
