"""`cvg generate --compare-seeds N`: the same request over N seeds, unguided and guided, each judged, side by
side on a contact sheet (what `make demo` shows)."""

from __future__ import annotations

import argparse
import json
import sys

from cvg.guidance.judges import Judge


def compare_seeds(pipe, call: dict, args: argparse.Namespace, judge: Judge | None) -> dict:
    """Seeds SEED..SEED+N-1, each unguided and guided: verdicts (with a judge), counts, a contact sheet;
    `call` holds the request's settings (`guide_steps` apart: each run sets its own)."""
    import torch

    from cvg.guidance.composition import Composition
    from cvg.io.video import contact_sheet, save_image, to_uint8

    if not args.composition:
        raise ValueError("--compare-seeds needs --composition")
    composition = Composition.parse(args.composition)
    rows, counts, runs = [], {"unguided": 0, "guided": 0}, []
    for seed in range(args.seed, args.seed + args.compare_seeds):
        for name, guide_steps in (("unguided", 0), ("guided", None)):
            out = pipe(
                args.prompt,
                args.composition,
                negative_prompt=args.negative_prompt,
                generator=torch.Generator().manual_seed(seed),
                **{**call, "guide_steps": guide_steps},
            )
            frames = to_uint8(out.frames[0])
            run = {"seed": seed, "run": name}
            if judge is not None:
                verdict = judge(frames, composition)
                run.update(ok=verdict.ok, reason=verdict.reason, failure=verdict.failure)
                counts[name] += verdict.ok
            print(json.dumps(run), file=sys.stderr)
            runs.append(run)
            mark = "" if judge is None else (" ok" if run["ok"] else " not ok")
            rows.append((f"seed {seed} {name}{mark}", frames))
    result = {"runs": runs, "seeds": args.compare_seeds}
    if judge is not None:
        result["counts"] = counts
        print(
            f"{args.composition!r}: unguided {counts['unguided']} of {args.compare_seeds} seeds, guided "
            f"{counts['guided']} of {args.compare_seeds}",
            file=sys.stderr,
        )
    if args.contact_sheet:
        result["contact_sheet"] = str(save_image(contact_sheet(rows), args.contact_sheet))
    return result
