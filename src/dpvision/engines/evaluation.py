"""Evaluation: mean loss, accuracy and predictions of a model on a labelled image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.data.tensors import ImageTensors


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, *, batch_size: int = 1024,
             device: torch.device | str = "cpu") -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and predictions [N] of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(data), batch_size):
        images = data.normalize(data.images[start:start + batch_size].to(device))  # [b, C, H, W]
        labels = data.labels[start:start + batch_size].to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    model.train(was_training)
    predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    accuracy = float((predictions == data.labels).float().mean()) if len(data) else float("nan")
    return total_loss / max(len(data), 1), accuracy, predictions
