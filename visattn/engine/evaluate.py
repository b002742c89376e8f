"""Evaluation: a confusion matrix summed over batches and processes -> mIoU, per-class IoU, aAcc.

Inference is whole-image or sliding-window (:meth:`Segmentor.inference`), optionally multi-scale and
flipped (softmax scores averaged, mmseg's ``TTA``); logits are resized to the label size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .dist import all_reduce_sum, get_rank, get_world_size, is_main

__all__ = ["confusion_matrix", "evaluate", "format_table", "metrics_from_confusion"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    keep = (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU / aAcc / mAcc (percent) and per-class IoU; classes absent from both ground truth and prediction
    (empty union) are NaN and left out of the mean (mmseg's ``IoUMetric``)."""
    conf = conf.double()
    tp = conf.diag()
    gt, pred = conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = tp / union  # 0/0 -> nan for classes never seen
    acc = tp / gt
    names = list(class_names) if class_names else [str(i) for i in range(conf.shape[0])]
    per_class = {n: (None if math.isnan(v) else round(100 * v, 2)) for n, v in zip(names, iou.tolist())}
    return {
        "mIoU": round(100 * float(iou.nanmean()), 2),
        "aAcc": round(100 * float(tp.sum() / conf.sum().clamp_min(1)), 2),
        "mAcc": round(100 * float(acc.nanmean()), 2),
        "IoU": per_class,
    }


def format_table(metrics: dict[str, Any]) -> str:
    rows = [f"{'class':<20} {'IoU':>7}"] + [
        f"{n:<20} {'-' if v is None else f'{v:.2f}':>7}" for n, v in metrics["IoU"].items()
    ]
    rows.append(f"mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  mAcc {metrics['mAcc']:.2f}")
    return "\n".join(rows)


def _logits(model, image: torch.Tensor, eval_cfg: dict[str, Any], out_size) -> torch.Tensor:
    scores = 0
    scales = eval_cfg.get("scales") or [1.0]
    flips = [False, True] if eval_cfg.get("flip") else [False]
    h, w = image.shape[-2:]
    for s in scales:
        x = (
            image
            if s == 1.0
            else F.interpolate(
                image, size=(int(h * s + 0.5), int(w * s + 0.5)), mode="bilinear", align_corners=False
            )
        )
        for flip in flips:
            xi = x.flip(-1) if flip else x
            out = model.inference(
                xi,
                mode=eval_cfg.get("mode", "whole"),
                crop_size=eval_cfg.get("crop_size"),
                stride=eval_cfg.get("stride"),
            )
            out = out.flip(-1) if flip else out
            out = F.interpolate(out.float(), size=out_size, mode="bilinear", align_corners=False)
            scores = scores + (out.softmax(1) if len(scales) * len(flips) > 1 else out)
    return scores


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    num_classes: int,
    eval_cfg: dict[str, Any] | None = None,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    out_json: str | None = None,
) -> dict[str, Any]:
    """mIoU of ``model`` (a :class:`Segmentor`, unwrapped) on ``dataset`` (normalised image, mask pairs).

    Every process takes images ``rank::world_size`` (no padding duplicates) and the confusion matrices
    are summed with ``all_reduce``. The image is resized as the model's test pipeline does
    (``data.test_scale``) and the logits back to the label size. Returns the metrics (and writes them as
    JSON on the main process when ``out_json`` is given).
    """
    eval_cfg = dict(eval_cfg or {})
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    indices = range(get_rank(), len(dataset), get_world_size())
    if eval_cfg.get("max_images"):
        indices = [i for i in indices if i < eval_cfg["max_images"]]
    it = indices
    if progress and is_main():
        from tqdm import tqdm

        it = tqdm(indices, desc="eval", dynamic_ncols=True)
    for i in it:
        image, mask = dataset[i]
        image = torch.as_tensor(image).unsqueeze(0).to(device)
        mask = torch.as_tensor(mask).to(device)
        th, tw = model.test_size(*image.shape[-2:])
        if (th, tw) != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=(th, tw), mode="bilinear", align_corners=False)
        pred = _logits(model, image, eval_cfg, tuple(mask.shape[-2:])).argmax(1)[0]
        conf += confusion_matrix(pred, mask, num_classes, ignore_index)
    all_reduce_sum(conf)
    model.train(was_training)
    metrics = metrics_from_confusion(conf.cpu(), class_names)
    if out_json and is_main():
        from ..atomic import atomic_write_text

        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        # Atomic: a run killed while writing keeps its previous result file, never a truncated one.
        atomic_write_text(out_json, json.dumps(metrics, indent=2) + "\n")
    return metrics
