"""Frozen-feature evaluation: weighted k-NN (DINO's) and a linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """``train`` and ``others`` shifted and scaled per feature by ``train``'s mean and std."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 of a k-NN vote on cosine similarity, each neighbour weighted by
    ``exp(similarity / temperature)`` (Wu et al., 2018; DINO's ``knn_classifier``)."""
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sims, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(dim=1) == test_labels[start : start + chunk]).sum().item()
    return correct / len(test)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int = 300,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 of a logistic regression trained full-batch (AdamW from zeros, so no randomness)
    on standardized train features."""
    with torch.inference_mode(False), torch.enable_grad():
        train, test = standardize(train_features.float().clone(), test_features.float().clone())
        weight = torch.zeros(train.shape[1], num_classes, device=train.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=train.device, requires_grad=True)
        optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
        labels = train_labels.clone()
        for _ in range(steps):
            loss = F.cross_entropy(train @ weight + bias, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = (test @ weight + bias).argmax(dim=1)
    return (predicted == test_labels).float().mean().item()
