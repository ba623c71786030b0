"""`ultrasound-ai foundation VERB ...`: pretrain, train, segment, classify, simulate, evaluate.

Kept free of torch at import time so `ultrasound-ai --help` stays fast.
"""

from __future__ import annotations

import json
import sys

from ultrasound_ai.core.errors import InputError


def _data_overrides(args, task: str) -> dict:
    """--data simulate | FOLDER (+ --format) -> config.data entries."""
    data: dict = {}
    if args.data and args.data != "simulate":
        fmt = getattr(args, "format", None) or ("folder" if task == "pretrain" else "busi")
        data.update(source=fmt, root=args.data)
    elif args.data == "simulate":
        data["source"] = "simulate"
    if getattr(args, "label_fraction", None) is not None:
        data["label_fraction"] = args.label_fraction
    return data


def _config(args, task: str):
    from ultrasound_ai.core.training_config import config_from_args, deep_merge
    from ultrasound_ai.foundation.training import default_config

    defaults = default_config(task)
    extra: dict = {"data": _data_overrides(args, task), "model": {}}
    if args.preset:
        extra["model"]["preset"] = args.preset
    if getattr(args, "pretrained", None):
        extra["model"]["pretrained"] = args.pretrained
    if getattr(args, "batch_size", None):
        extra["schedule"] = {"batch_size": args.batch_size}
    cfg = config_from_args(args, defaults=defaults)
    # CLI options lie over the config file.
    from ultrasound_ai.core.training_config import load_config

    return load_config(deep_merge(cfg.to_dict(), extra))


def _run_training(args, task: str) -> int:
    from ultrasound_ai.foundation.training import train_foundation

    cfg = _config(args, task)
    result = train_foundation(cfg, task, resume=args.resume, progress_bar=not args.quiet)
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "metrics": result.metrics,
                      "best_step": result.best_step}))
    return 0


def pretrain(args) -> int:
    return _run_training(args, "pretrain")


def train(args) -> int:
    if args.task not in ("segment", "classify"):
        raise InputError(f"--task: expected segment or classify, got {args.task!r}")
    return _run_training(args, args.task)


def segment(args) -> int:
    from ultrasound_ai.core.atomic import check_output_path
    from ultrasound_ai.foundation.inference import segment_file

    # Before the model is loaded and run: the writer picks the format from the extension.
    check_output_path(args.output, what="--out", extensions=(".png", ".nrrd", ".nii.gz", ".nii", ".mha"))
    if args.probabilities:
        check_output_path(args.probabilities, what="--probabilities", extensions=(".nrrd", ".nii.gz", ".nii", ".mha"))
    summary = segment_file(args.input, args.output, args.model, device=args.device,
                           probabilities_path=args.probabilities, **_pixel_options(args))
    print(json.dumps(summary))
    return 0


def classify(args) -> int:
    from ultrasound_ai.foundation.inference import classify_file

    print(json.dumps(classify_file(args.input, args.model, device=args.device, **_pixel_options(args))))
    return 0


def _pixel_options(args) -> dict:
    """pixel_spacing_mm / region / frame from --pixel-spacing, --region, --frame and --dicom (a DICOM file
    whose ultrasound regions give both the pixel size and the image rectangle)."""
    spacing = args.pixel_spacing
    if spacing is not None and spacing != ["file"]:
        try:
            spacing = [float(v) for v in spacing]
        except ValueError:
            raise InputError(f"--pixel-spacing: expected SX SY in mm or 'file', got {' '.join(spacing)}") from None
    elif spacing == ["file"]:
        spacing = "file"
    region = args.region
    if args.dicom:
        from ultrasound_ai.foundation.dicom_regions import image_region

        found = image_region(args.dicom)
        if found is None:
            print(f"warning: {args.dicom} has no ultrasound regions with a physical pixel size", file=sys.stderr)
        else:
            spacing = spacing if spacing is not None else list(found.pixel_spacing_mm)
            region = region if region is not None else list(found.bounds)
    return {"pixel_spacing_mm": spacing, "region": region, "frame": args.frame}


def _add_pixel_arguments(p) -> None:
    p.add_argument("--pixel-spacing", nargs="+", dest="pixel_spacing", metavar="MM",
                   help="the input's pixel size: SX SY in mm, or 'file' (the file's spacing); inputs are resampled "
                        "to the model's training pixel size. Without it the whole image is resized (with a warning)")
    p.add_argument("--region", nargs=4, type=int, metavar=("X0", "Y0", "X1", "Y1"),
                   help="only this image rectangle (inclusive pixel indices); outside is background")
    p.add_argument("--dicom", help="the DICOM file the input came from: its ultrasound regions give the pixel size "
                                   "and the image rectangle")
    p.add_argument("--frame", type=int, help="only this frame (0-based) of a multi-frame input")


def simulate(args) -> int:
    from ultrasound_ai.foundation.bmode_sim import write_busi_folder

    labels = [int(v) for v in args.classes.split(",")] if args.classes else [0, 1, 2]
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.count, desc="simulate", unit="image")
    info = write_busi_folder(args.output, args.count, args.seed, args.size, labels,
                             progress=(lambda f: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    print(json.dumps({"output": args.output, **info}))
    return 0


def evaluate(args) -> int:
    """Dice (segment models) or accuracy (classify models) on a BUSI-layout folder or simulated images."""
    import numpy as np

    from ultrasound_ai.foundation import datasets as ds
    from ultrasound_ai.foundation.classifier_study import macro_f1
    from ultrasound_ai.foundation.inference import (
        classify,
        evaluate_segmentation,
        load_model,
        segment,
        training_spacing,
    )

    lm = load_model(args.model, args.device)
    # Simulated images are made at the training pixel size; folder data sets (BUSI, CAMUS) record none, and
    # each image is read whole, as training read it.
    opts = {"pixel_spacing_mm": training_spacing(lm) if args.data == "simulate" else None, "warn": lambda m: None}
    if args.data == "simulate":
        labels = [0, 1] if lm.task == "segment" else [0, 1, 2]
        items = ds.simulated_set(args.seed, args.count, lm.size, labels)
        names = None
    else:
        fmt = args.format or "busi"
        if fmt == "camus":
            items, names = ds.load_camus(args.data), None
        else:
            items, names = ds.load_busi(args.data, require_masks=(lm.task == "segment"))
        if not args.all:
            items = [items[i] for i in ds.fixed_split(len(items), args.split_seed)[2]]
    out: dict = {"model": lm.card.get("name"), "images": len(items)}
    if lm.task == "segment":
        k = int(lm.card["configuration"]["num_classes"])
        res = evaluate_segmentation(lambda im: segment(im, lm, **opts)[0], [it.image for it in items],
                                    [it.mask for it in items], k)
        out.update(dice=res["dice"], dice_std=res["dice_std"])
    elif lm.task == "classify":
        probs, model_names = classify(np.stack([ds.resize_image(it.image, lm.size) for it in items]), lm, **opts)
        pred = probs.argmax(1)
        truth = np.array([it.label for it in items])
        if names is not None and list(names) != list(model_names):
            raise InputError(f"data {args.data}: classes {names} differ from the model's {model_names}")
        out.update(accuracy=float((pred == truth).mean()), macro_f1=macro_f1(truth, pred, len(model_names)))
    else:
        raise InputError(f"model {args.model}: a pre-training model; evaluate needs a segment or classify model")
    print(json.dumps(out))
    return 0


def add_parser(subparsers) -> None:
    from ultrasound_ai.core.deprecation import add_argument
    from ultrasound_ai.core.device import add_device_argument
    from ultrasound_ai.core.training_config import add_training_arguments

    group = subparsers.add_parser("foundation", help="ultrasound foundation model (USFM): pre-train, fine-tune, "
                                                     "segment, classify")
    verbs = group.add_subparsers(dest="verb", metavar="VERB")

    def training_parser(name, help_text):
        p = verbs.add_parser(name, help=help_text)
        add_training_arguments(p)
        p.add_argument("--data", default=None, help="'simulate' (built-in simulator) or a data folder")
        p.add_argument("--format", choices=["folder", "busi", "camus"],
                       help="layout of the --data folder (pretrain: folder; train: busi or camus)")
        p.add_argument("--preset", choices=["micro", "tiny", "small", "base"], help="ViT size (default tiny)")
        p.add_argument("--batch-size", type=int, dest="batch_size", help="images per step and process")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    p = training_parser("pretrain", "masked-image-modelling pre-training (spatial-frequency dual masking)")
    p.set_defaults(func=pretrain)

    p = training_parser("train", "fine-tune a segmentation or classification model")
    p.add_argument("--task", required=True, choices=["segment", "classify"])
    p.add_argument("--pretrained", help="checkpoint (.pt) or installed model name of a pre-trained encoder "
                                        "(same ViT configuration), e.g. usfm_vit_tiny_pretrained")
    p.add_argument("--label-fraction", type=float, dest="label_fraction", help="use this fraction of the labels")
    p.set_defaults(func=train)

    p = verbs.add_parser("segment", help="segment an image or a stack of frames into a label map")
    p.add_argument("input", help="image file (.png, .nrrd, .nii.gz, .mha)")
    add_argument(p, "--checkpoint", deprecated=("--model",), dest="model", required=True, metavar="NAME_OR_PT",
                 help="segmentation checkpoint (.pt) or installed model name")
    add_argument(p, "--out", deprecated=("--output",), dest="output", required=True,
                 help="label map (.png for one frame, .nrrd/.nii.gz)")
    p.add_argument("--probabilities", help="also write the foreground probability image here")
    _add_pixel_arguments(p)
    add_device_argument(p)
    p.set_defaults(func=segment)

    p = verbs.add_parser("classify", help="class probabilities of an image (JSON)")
    p.add_argument("input", help="image file (.png, .nrrd, .nii.gz, .mha); a stack gives one row per frame")
    add_argument(p, "--checkpoint", deprecated=("--model",), dest="model", required=True, metavar="NAME_OR_PT",
                 help="classification checkpoint (.pt) or installed model name")
    _add_pixel_arguments(p)
    add_device_argument(p)
    p.set_defaults(func=classify)

    p = verbs.add_parser("simulate", help="write simulated B-mode images in the BUSI layout")
    add_argument(p, "--out", deprecated=("--output",), dest="output", required=True,
                 help="folder to write CLASS/CLASS (n).png and _mask.png into")
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image size in pixels (square)")
    p.add_argument("--classes", help="comma-separated class indices to draw (0 benign, 1 malignant, 2 normal)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=simulate)

    p = verbs.add_parser("evaluate", help="Dice / accuracy of a model on a data set (JSON)")
    add_argument(p, "--checkpoint", deprecated=("--model",), dest="model", required=True, metavar="NAME_OR_PT",
                 help="segmentation or classification checkpoint (.pt) or installed model name")
    p.add_argument("--data", required=True, help="'simulate' or a BUSI-layout (or CAMUS) folder")
    p.add_argument("--format", choices=["busi", "camus"])
    p.add_argument("--all", action="store_true", help="every image, not only the fixed test split")
    p.add_argument("--split-seed", type=int, default=0, dest="split_seed")
    p.add_argument("--seed", type=int, default=200_000, help="simulated test set seed")
    p.add_argument("--count", type=int, default=50, help="simulated test images")
    add_device_argument(p)
    p.set_defaults(func=evaluate)
