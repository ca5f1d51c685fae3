"""Run DD-Ranking 0.2.0's evaluators on an export of `python -m storage.ddranking` (issue 15).

Runs inside DD-Ranking's own venv (its pins, numpy<2 and scipy<1.16, conflict with ours), so it
imports nothing from this repository: it reads OUT/export.json and the dataset root (an
ImageFolder `train/` + `val/` for DD-Ranking's `TinyImageNet`: 200 class folders, images already
at the export's size). On CPU, with the workarounds of ../shared/reference/DD-RANKING.md:

- hard evaluator: `aug_params={'beta': 1.0}` (its default names a key Cutmix does not read), a
  `step_size`, `test_interval` set after construction (it validates every 10th epoch only), and
  its `save_results` replaced (it appends each LRS twice, so the columns differ in length);
- soft evaluator (only when the export holds a teacher): `soft_label_mode='M'` (the teacher
  labels each augmented batch), `random_data_format='image'`, explicit `loss_fn_kwargs`;
- both: the export's own mean/std for the set and the random real subset (`custom_train_trans`,
  `custom_val_trans`), the distilled images' normalisation and the teacher's; its full-data
  student reads `train/` with its hard-coded ImageNet constants, as it always does;
- a fixed seed (its `set_seed()` seeds from the clock).

Every accuracy it trains (distilled, full data, random real; percent, best over its learning-rate
search) is caught at its helper and written to --out as JSON with its own scores, and the scores
recomputed from fractions (its paper's α in [-1, 1], DD-RANKING.md):

    python tools/ddranking_eval.py EXPORT DATA_ROOT --epochs 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def _caught(ev, name: str, log: list) -> None:
    """Wrap the evaluator's accuracy helper `name` to record each call's accuracy and LR."""
    helper = getattr(ev, name)

    def wrapped(*args, **kwargs):
        acc, lr = helper(*args, **kwargs)
        log.append(
            {
                "helper": name,
                "mode": kwargs.get("mode", "soft"),
                "image_path": kwargs.get("image_path"),
                "top1_percent": float(acc),
                "lr": lr,
            }
        )
        return acc, lr

    setattr(ev, name, wrapped)


def _which(call: dict, image_dir: str) -> str:
    if call["mode"] == "real":
        return "full_data"
    return "distilled" if call["image_path"] == image_dir else "random_real"


def lrs_from_fractions(
    full: float, syn_hard: float, syn: float, rdm: float, lam: float = 0.5
) -> dict:
    """HLR = full - syn_hard, IOR = syn - rdm (same protocol), α and LRS, from accuracies in
    percent, computed in fractions (the paper's α ∈ [-1, 1], so LRS ∈ [0, 1]); DD-Ranking 0.2.0
    feeds percentage points into exp."""
    hlr, ior = (full - syn_hard) / 100.0, (syn - rdm) / 100.0
    alpha = lam * ior - (1 - lam) * hlr
    lrs = (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": lrs}


def _mean(calls: list) -> float:
    return sum(c["top1_percent"] for c in calls) / len(calls)


def _accuracies(log: list, image_dir: str, helper: str) -> dict:
    out: dict = {}
    for call in log:
        if call["helper"] == helper:
            out.setdefault(_which(call, image_dir), []).append(
                {"top1_percent": call["top1_percent"], "lr": call["lr"]}
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="directory written by python -m storage.ddranking")
    ap.add_argument("data", help="dataset root with train/ and val/ (DD-Ranking's real_data_path)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-eval", type=int, default=1)
    ap.add_argument("--student", default="ConvNet-4-BN")
    ap.add_argument("--syn-lr", type=float, default=None, help="hard: no LR search for the set")
    ap.add_argument("--soft-syn-lr", type=float, default=None, help="soft: likewise")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-soft", action="store_true", help="hard-label evaluator only")
    ap.add_argument("--workdir", default=None, help="its random data and results (default: out)")
    ap.add_argument("--out", required=True, help="JSON of accuracies and scores")
    a = ap.parse_args()

    import ddranking
    import torch
    from ddranking.metrics import hard_label, soft_label
    from torchvision import transforms

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rec = json.load(open(os.path.join(a.export, "export.json")))
    image_dir = os.path.join(a.export, rec["image_dir"])
    work = a.workdir or os.path.dirname(os.path.abspath(a.out))
    seed = a.seed
    for mod in (hard_label, soft_label):  # its set_seed() seeds from the clock
        mod.set_seed = lambda seed_=None, _s=seed: ddranking.utils.set_seed(_s)
    hard_label.save_results = lambda results, path: None  # 0.2.0: LRS appended twice
    norm = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean=rec["mean"], std=rec["std"])]
    )
    size = (rec["image_size"], rec["image_size"])
    common = dict(
        dataset=rec["dataset"],
        real_data_path=a.data,
        ipc=rec["ipc"],
        model_name=a.student,
        data_aug_func="cutmix",
        aug_params={"beta": 1.0},
        optimizer="sgd",
        lr_scheduler="step",
        step_size=max(1, a.epochs // 2),
        num_eval=a.num_eval,
        im_size=size,
        num_epochs=a.epochs,
        real_batch_size=a.batch_size,
        syn_batch_size=a.batch_size,
        num_workers=0,
        custom_train_trans=norm,
        custom_val_trans=norm,
        device="cpu",
        random_data_format="image",
        eval_full_data=True,
    )
    result: dict = {
        "ddranking_version": getattr(ddranking, "__version__", "0.2.0"),
        "torch": torch.__version__,
        "settings": {k: str(v) if k.startswith("custom") else v for k, v in common.items()},
        "export": rec,
    }

    t0 = time.time()
    log: list = []
    ev = hard_label.LabelRobustScoreHard(
        **common,
        save_path=os.path.join(work, "hard", "obj_scores.csv"),
        random_data_path=os.path.join(work, "random_hard"),
    )
    ev.test_interval = 1
    result["loaded"] = {
        "num_classes": ev.num_classes,
        "train_images": len(ev.dst_train),
        "val_images": len(ev.test_loader_syn.dataset),
        "im_size": list(ev.im_size),
    }
    _caught(ev, "_compute_hard_label_metrics_helper", log)
    scores = ev.compute_metrics(image_path=image_dir, syn_lr=a.syn_lr)
    acc = _accuracies(log, image_dir, "_compute_hard_label_metrics_helper")
    result["hard"] = {
        "seconds": time.time() - t0,
        "accuracies": acc,
        "scores_ddranking": {k: float(v) for k, v in scores.items()},
        "scores_fractions": lrs_from_fractions(
            _mean(acc["full_data"]),
            _mean(acc["distilled"]),
            _mean(acc["distilled"]),
            _mean(acc["random_real"]),
        ),
    }
    print(json.dumps({"hard": result["hard"]}, indent=1), flush=True)

    teacher = rec.get("teacher") or {}
    if a.no_soft or not teacher.get("exported"):
        result["soft"] = {"skipped": "--no-soft" if a.no_soft else teacher.get("reason")}
    else:
        t0 = time.time()
        log = []
        sv = soft_label.LabelRobustScoreSoft(
            **common,
            soft_label_criterion="kl",
            loss_fn_kwargs={"temperature": 4.0, "scale_loss": False},
            soft_label_mode="M",
            save_path=os.path.join(work, "soft", "obj_scores.csv"),
            random_data_path=os.path.join(work, "random_soft"),
            teacher_dir=os.path.join(a.export, rec["teacher_dir"]),
            teacher_model_names=[teacher["name"]],
            tea_use_torchvision=bool(teacher.get("use_torchvision")),
        )
        sv.test_interval = 1
        _caught(sv, "_compute_hard_label_metrics_helper", log)
        _caught(sv, "_compute_soft_label_metrics_helper", log)
        scores = sv.compute_metrics(image_path=image_dir, syn_lr=a.soft_syn_lr)
        hard = _accuracies(log, image_dir, "_compute_hard_label_metrics_helper")
        soft = _accuracies(log, image_dir, "_compute_soft_label_metrics_helper")
        result["soft"] = {
            "seconds": time.time() - t0,
            "accuracies": {"hard": hard, "soft": soft},
            "scores_ddranking": {k: float(v) for k, v in scores.items()},
            "scores_fractions": lrs_from_fractions(
                _mean(hard["full_data"]),
                _mean(hard["distilled"]),
                _mean(soft["distilled"]),
                _mean(soft["random_real"]),
            ),
        }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"soft": result["soft"]}, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
