"""Foundation classifier (benign / malignant / normal): accuracy and macro F1 on held-out simulated images
whose scanner settings no training image used, pre-trained encoder vs the same ViT from scratch, at 20 %
and 100 % of the labels. Writes the `foundation_classifier` section of BENCHMARKS.md (see
ultrasound_ai/foundation/classifier_study.py). No timing claim.

    python bench/bench_foundation_classifier.py [--device cpu] [--output-dir runs/classifier_study]
        [--pretrain-encoder] [--cell INIT,FRACTION,SEED] [--seeds 0,1] [--steps N] [--no-write] [--note TEXT]
        [--ship NAME [--ship-cell FRACTION,SEED]] [--probe]

The pre-trained arm fine-tunes from usfm_vit_tiny_pretrained_wide: the shipped usfm_vit_tiny_pretrained
with its masked image modelling continued on unlabelled images drawn across the broad training band. Both
arms pool the tokens with the same attention-pooling head. --pretrain-encoder trains (or resumes) that
encoder, installs it beside the study's runs (<output-dir>/encoder/installed, not shipped: the classifier
carries its weights) and exits; a pre-trained cell builds it first when it is missing. --probe adds
a linear probe of the encoders' mean-pooled features (random, the study's encoder, and the wide one if
installed), fitted on the labelled images and scored on the validation images: how much class
information pre-training put into the features.

--cell trains (or resumes) one cell only and exits, so cells can run as separate background processes
(the pre-trained arm's probe stage first, then its fine-tuning); without it every missing cell is
trained, then all are evaluated and the section written (means over seeds, seed-by-seed rows and the
paired pre-trained minus scratch differences). --ship NAME then installs a pre-trained cell
(--ship-cell FRACTION,SEED, default the 100 % cell of seed 0) as Resources/Models/NAME.pt (float16) with
its card, which records its held-out figures beside the from-scratch cell's of the same labels.
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output-dir", default="runs/classifier_study")
    ap.add_argument("--pretrain-encoder", action="store_true", dest="pretrain_encoder",
                    help="pre-train the study's encoder, install it, and exit")
    ap.add_argument("--cell", help="INIT,FRACTION,SEED (init: pretrained | scratch): train this cell only")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps per cell")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--note", help="a paragraph appended to the section")
    ap.add_argument("--note-file", dest="note_file", help="a file whose text is appended to the section (read at the end)")
    ap.add_argument("--no-train", action="store_true", dest="no_train",
                    help="evaluate the cells already trained; train none (missing cells show as 'not run')")
    ap.add_argument("--probe", action="store_true", help="add the linear probe of the encoders to the section")
    ap.add_argument("--ship", metavar="NAME", help="install a pre-trained cell as Resources/Models/NAME.pt")
    ap.add_argument("--ship-cell", dest="ship_cell", default="1,0", metavar="FRACTION,SEED",
                    help="the pre-trained cell --ship installs, compared with the scratch cell of the same labels "
                         "(default 1,0)")
    from report import parse_bench_args

    args = parse_bench_args(ap, argv, timing=False)  # accuracy: the load is recorded, not awaited

    import torch

    torch.set_num_threads(args.threads)
    from ultrasound_ai.foundation import classifier_study as cs

    over: dict = {"output_dir": args.output_dir, "device": args.device}
    if args.seeds:
        over["seeds"] = [int(v) for v in args.seeds.split(",")]
    if args.steps:
        over["schedule"] = {"steps": args.steps}
    s = cs.settings(over)

    def install_encoder():
        res = cs.pretrain_encoder(s, progress_bar=False)
        # Installed beside the study's runs, not shipped: the classifier carries its weights.
        card = cs.ship_encoder(s, Path(cs.encoder_source(s)).parent)
        print(json.dumps({"encoder": card["name"], "steps": res.steps, "best_step": res.best_step,
                          "best_metrics": res.best_metrics, "size_bytes": card["size_bytes"]}))

    if args.pretrain_encoder:
        install_encoder()
        return 0
    if ((args.cell or "").startswith("pretrained") or (not args.cell and not args.no_train)) and \
            s["pretrained"] == s["encoder"]["name"] and not Path(cs.encoder_source(s)).is_file():
        install_encoder()  # not installed yet: pre-train (or resume) it first
    if args.cell:
        init, fraction, seed = args.cell.split(",")
        res = cs.train_cell(s, init, float(fraction), int(seed), progress_bar=False)
        print(json.dumps({"cell": args.cell, "steps": res.steps, "best_step": res.best_step,
                          "best_metrics": res.best_metrics}))
        return 0
    for fraction in s["fractions"] if not args.no_train else []:
        for seed in s["seeds"]:
            for init in cs.INITS:
                cs.train_cell(s, init, fraction, seed)
    results = cs.evaluate_study(s)
    body = cs.format_table(results)
    if args.probe:
        from ultrasound_ai.models.registry import list_models

        encoders = {"random initialisation": None, s["pretrained"]: s["pretrained"]}
        if any(e.name == s["encoder"]["name"] for e in list_models()):
            encoders[s["encoder"]["name"]] = s["encoder"]["name"]
        rows = cs.linear_probe(s, encoders, s["fractions"])
        body += ("\nLinear probe before fine-tuning (logistic regression on the mean-pooled features, fitted on the "
                 "labelled images of label seed 0, scored on the validation images, training distribution):\n\n"
                 "| encoder | labelled | train accuracy | validation accuracy | validation macro F1 |\n|---|---|---|---|---|\n"
                 + "".join(f"| {r['encoder']} | {r['labelled']} | {r['train_accuracy']:.3f} | {r['val_accuracy']:.3f} | "
                           f"{r['val_macro_f1']:.3f} |\n" for r in rows))
    if args.note:
        body += "\n" + args.note.strip() + "\n"
    if args.note_file:
        body += "\n" + Path(args.note_file).read_text().strip() + "\n"
    print(body)
    print(json.dumps(results["runs"], indent=1))
    if args.ship:
        from report import BENCHMARKS

        folder = Path(s["output_dir"])
        fraction, seed = float(args.ship_cell.split(",")[0]), int(args.ship_cell.split(",")[1])
        card = cs.ship(folder / cs.cell_name("pretrained", fraction, seed), s, args.ship,
                       BENCHMARKS.parent / "Resources" / "Models", study=results,
                       comparison={"scratch_same_labels_and_schedule": folder / cs.cell_name("scratch", fraction, seed)})
        print(json.dumps({"shipped": args.ship, "size_bytes": card["size_bytes"], "metrics": card["metrics"]}))
    if not args.no_write:
        from report import write_section

        # The recorded command leaves the reading out (it follows the table).
        argv = list(sys.argv[1:] if argv is None else argv)
        for flag in ("--note", "--note-file"):
            while flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        write_section("foundation_classifier", "Foundation model: benign / malignant / normal classifier on held-out "
                      "scanner settings", body, device=args.device,
                      command=" ".join(["python bench/bench_foundation_classifier.py"] + argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
