"""Label-efficiency study of the foundation model: lesion Dice with 10/20/50/100 % of the labels,
pre-trained vs from scratch (>= 3 seeds per cell), and Otsu + largest component. Writes the
`label_efficiency` section of BENCHMARKS.md (see ultrasound_ai/foundation/study.py).

    python bench/bench_label_efficiency.py [--device auto] [--output-dir runs/label_efficiency]
        [--pretrained PATH] [--pretrain-steps N] [--finetune-steps N] [--quick] [--no-write] [--note TEXT]

--quick runs a micro setting in seconds (a smoke test; its numbers mean nothing and are not written
unless --benchmarks names another file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output-dir", default="runs/label_efficiency")
    ap.add_argument("--pretrained", help="use this pre-trained usfm checkpoint instead of pre-training")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--finetune-steps", type=int)
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="micro smoke-test setting")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--benchmarks", help="write the section into this file instead of BENCHMARKS.md")
    ap.add_argument("--note", help="a paragraph appended to the section (e.g. how loaded the machine was)")
    from report import parse_bench_args

    args = parse_bench_args(ap, argv, timing=False)  # accuracy: the load is recorded, not awaited

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from report import BENCHMARKS, write_section

    from ultrasound_ai.core.training_config import deep_merge
    from ultrasound_ai.foundation.study import QUICK_SETTINGS, format_table, run_study

    settings: dict = deep_merge(QUICK_SETTINGS, {}) if args.quick else {}
    settings.update(output_dir=args.output_dir, device=args.device)
    if args.pretrained:
        settings["pretrained"] = args.pretrained
    if args.pretrain_steps:
        settings = deep_merge(settings, {"pretrain": {"steps": args.pretrain_steps}})
    if args.finetune_steps:
        settings = deep_merge(settings, {"finetune": {"steps": args.finetune_steps}})
    if args.seeds:
        settings["seeds"] = [int(v) for v in args.seeds.split(",")]

    def progress(fraction, message):
        print(f"[{fraction * 100:5.1f} %] {message}", file=sys.stderr, flush=True)

    results = run_study(settings, progress=progress)
    body = format_table(results)
    if args.note:
        body += "\n" + args.note.strip() + "\n"
    print(body)
    print(json.dumps(results["claims"]))
    target = Path(args.benchmarks) if args.benchmarks else BENCHMARKS
    if not args.no_write and (not args.quick or args.benchmarks):
        write_section("label_efficiency", "Foundation model: label efficiency (simulated lesion segmentation)", body,
                      device=args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
                      path=target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
