"""What single tokens hold, by linear probes trained on half of the images and scored on the
other half, high-norm against normal tokens: the patch's position and its pixels (paper Fig. 7),
and the image's class from one token (Fig. 8).

Probes are fitted here rather than with a library: a softmax regression by L-BFGS and a ridge
regression in closed form are a few lines of torch and run where the features are."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..measures.figures import plt, save_figure
from ..objectives.knn import standardize


def image_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the probes' training and test images: a fixed random half each (sorted)."""
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return index[: (n + 1) // 2].sort().values, index[(n + 1) // 2 :].sort().values


def fit_softmax_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3
) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS."""
    linear = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.requires_grad_(False)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple:
    """Weights and bias of the ridge regression of ``y`` on ``x`` (penalty ``alpha`` per sample
    on the weights)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = (x - x_mean).double(), (y - y_mean).double()
    eye = torch.eye(x.shape[1], dtype=torch.double, device=x.device)
    gram = xc.T @ xc + alpha * len(x) * eye
    weight = torch.linalg.solve(gram, xc.T @ yc).float()
    return weight, y_mean - x_mean @ weight


def _sample(n: int, limit: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


def _by_kind(values: torch.Tensor, high_norm: torch.Tensor) -> dict:
    return {
        "normal": values[~high_norm].mean().item() if (~high_norm).any() else None,
        "high_norm": values[high_norm].mean().item() if high_norm.any() else None,
    }


def position_probe(
    patches: torch.Tensor,
    grid: tuple[int, int],
    high_norm: torch.Tensor,
    max_tokens: int = 20000,
    device: str | torch.device = "cpu",
) -> dict:
    """Predict each patch token's position (one of h x w classes) from the token alone:
    ``top1`` accuracy and mean ``distance`` (in patches) to the true position, for normal and
    high-norm test tokens. The probe is fitted on ``device``."""
    n, p, d = patches.shape
    train, test = image_split(n)
    positions = torch.arange(p).expand(n, p)
    x_train = patches[train].reshape(-1, d)
    keep = _sample(len(x_train), max_tokens)
    x_train, x_test = standardize(x_train[keep].to(device), patches[test].reshape(-1, d).to(device))
    probe = fit_softmax_regression(x_train, positions[train].reshape(-1)[keep].to(device), p)
    predicted = probe(x_test).argmax(-1).cpu()
    truth = positions[test].reshape(-1)
    rows = lambda i: torch.stack([i // grid[1], i % grid[1]], -1).float()  # noqa: E731
    distance = (rows(predicted) - rows(truth)).norm(dim=-1)
    flags = high_norm[test].reshape(-1)
    return {
        "top1": _by_kind((predicted == truth).float(), flags),
        "distance": _by_kind(distance, flags),
        "test_tokens": {"normal": int((~flags).sum()), "high_norm": int(flags.sum())},
    }


def patch_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each patch's pixels, (N, P, 3 * patch_size**2), patches in row-major order."""
    return F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2)


def pixel_probe(
    patches: torch.Tensor,
    images: torch.Tensor,
    patch_size: int,
    high_norm: torch.Tensor,
    max_tokens: int = 20000,
    device: str | torch.device = "cpu",
) -> dict:
    """Reconstruct each patch's (normalized) pixels from its token by ridge regression (fitted
    on ``device``): mean L2 error per token for normal and high-norm test tokens."""
    n, p, d = patches.shape
    train, test = image_split(n)
    target = patch_pixels(images, patch_size)
    x_train = patches[train].reshape(-1, d)
    y_train = target[train].reshape(-1, target.shape[-1])
    keep = _sample(len(x_train), max_tokens)
    x_train, x_test = standardize(x_train[keep].to(device), patches[test].reshape(-1, d).to(device))
    weight, bias = fit_ridge(x_train, y_train[keep].to(device))
    y_test = target[test].reshape(-1, target.shape[-1]).to(device)
    error = (x_test @ weight + bias - y_test).norm(dim=-1).cpu()
    return {"l2": _by_kind(error, high_norm[test].reshape(-1))}


def token_classification(
    cls: torch.Tensor,
    patches: torch.Tensor,
    high_norm: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
) -> dict | None:
    """Image class from one token (logistic regression): [CLS], a random normal patch token and
    a random high-norm patch token of each image (images without one are left out): test
    accuracy of each, and the test images each was scored on (fitted on ``device``). None
    without two labelled classes."""
    known = labels >= 0
    if labels[known].unique().numel() < 2:
        return None
    generator = torch.Generator().manual_seed(0)

    def pick(flags: torch.Tensor) -> torch.Tensor:
        # One flagged token per image (-1 where none), drawn at random.
        scores = torch.rand(flags.shape, generator=generator).masked_fill(~flags, -1)
        best = scores.argmax(dim=1)
        return torch.where(flags.any(dim=1), best, -1)

    rows = torch.arange(len(labels))
    choices = {"cls": None, "normal": pick(~high_norm), "high_norm": pick(high_norm)}
    train, test = image_split(len(labels))
    out = {}
    for kind, choice in choices.items():
        if choice is None:
            usable, features = known, cls
        else:
            usable = known & (choice >= 0)
            features = patches[rows, choice.clamp_min(0)]
        tr, te = train[usable[train]], test[usable[test]]
        if labels[tr].unique().numel() < 2 or not len(te):
            out[kind] = {"accuracy": None, "test_images": int(len(te))}
            continue
        x_train, x_test = standardize(features[tr].to(device), features[te].to(device))
        probe = fit_softmax_regression(x_train, labels[tr].to(device), int(labels.max()) + 1)
        predicted = probe(x_test).argmax(-1).cpu()
        accuracy = (predicted == labels[te]).float().mean().item()
        out[kind] = {"accuracy": accuracy, "test_images": int(len(te))}
    return out


def plot_probes(results: dict[str, dict], path: Path) -> Path:
    """Bars per model: position top-1, position distance, pixel L2 and one-token accuracy,
    normal against high-norm tokens."""
    panels = [
        ("position top-1", lambda r: r["position"]["top1"]),
        ("position distance (patches)", lambda r: r["position"]["distance"]),
        ("pixel reconstruction L2", lambda r: r["pixels"]["l2"]),
        (
            "class from one token",
            lambda r: {k: v["accuracy"] for k, v in (r["classification"] or {}).items()},
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    names = list(results)
    width = 0.8 / max(len(names), 1)
    for ax, (title, get) in zip(axes[0], panels, strict=True):
        kinds = (
            ["cls", "normal", "high_norm"] if title.startswith("class") else ["normal", "high_norm"]
        )
        for i, name in enumerate(names):
            values = get(results[name])
            heights = [values.get(k) or 0.0 for k in kinds]
            ax.bar([j + i * width for j in range(len(kinds))], heights, width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(kinds))])
        ax.set_xticklabels([k.replace("_", "-") for k in kinds], fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("linear probes on single tokens", fontsize=10)
    return save_figure(fig, path)
