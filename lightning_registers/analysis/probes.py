"""What single tokens hold, by linear probes trained on half of the images and scored on the
other half, high-norm against normal tokens: the patch's position and its pixels (paper Fig. 7),
and the image's class from one token (Fig. 8).

Probes are fitted here rather than with a library: a softmax regression by L-BFGS and a ridge
regression in closed form are a few lines of torch and run where the features are."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..measures.figures import plt
from ..objectives.knn import standardize
from .figure_style import NA, legend_outside, save


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


# (title, y label, scale to the axis unit, the values by token kind of one model's results)
_PANELS = [
    ("position from one token", "top-1 accuracy (%)", 100, lambda r: r["position"]["top1"]),
    (
        "position from one token",
        "mean distance to the true position (patches)",
        1,
        lambda r: r["position"]["distance"],
    ),
    (
        "pixels from one token",
        "L2 error of the patch's normalized pixels",
        1,
        lambda r: r["pixels"]["l2"],
    ),
    (
        "image class from one token",
        "test accuracy (%)",
        100,
        lambda r: {k: v["accuracy"] for k, v in (r["classification"] or {}).items()},
    ),
]
_KIND_LABELS = {"cls": "[CLS]", "normal": "normal", "high_norm": "high-norm"}


def draw_probes(results: dict[str, dict]):
    """Bars per model: position top-1, position distance, pixel L2 and one-token class
    accuracy, normal against high-norm tokens, "n/a" where a probe has no value. Returns the
    figure."""
    fig, axes = plt.subplots(
        1, len(_PANELS), figsize=(4 * len(_PANELS), 3.2), squeeze=False, layout="constrained"
    )
    names = list(results)
    width = 0.8 / max(len(names), 1)
    missing = False
    for ax, (title, ylabel, scale, get) in zip(axes[0], _PANELS, strict=True):
        kinds = (
            ["cls", "normal", "high_norm"] if title.startswith("image") else ["normal", "high_norm"]
        )
        for i, name in enumerate(names):
            values = get(results[name])
            x = [j + i * width for j in range(len(kinds))]
            heights = [values.get(k) for k in kinds]
            drawn = [(at, scale * h) for at, h in zip(x, heights, strict=True) if h is not None]
            bars = ax.bar(
                [at for at, _ in drawn], [h for _, h in drawn], width, label=name, color=f"C{i}"
            )
            ax.bar_label(bars, fmt="{:.3g}", fontsize=7)  # a value near 0 is not a missing one
            for at, h in zip(x, heights, strict=True):
                if h is None:
                    missing = True
                    ax.text(
                        at, 0.02, NA, transform=ax.get_xaxis_transform(), ha="center", fontsize=8
                    )
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(kinds))])
        ax.set_xticklabels([_KIND_LABELS[k] for k in kinds], fontsize=8)
        ax.set_xlim(-0.5, len(kinds) - 0.5 + width * (len(names) - 1))
        if scale == 100:
            ax.set_ylim(0, 105)
        ax.set_xlabel("test token", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
    legend_outside(axes[0, -1])
    if missing:
        fig.text(
            0.5,
            -0.02,
            f"{NA}: no test token of that kind (the image class also needs labels of two classes)",
            ha="center",
            va="top",
            fontsize=8,
        )
    fig.suptitle("linear probes on single output tokens (fitted on half the images)", fontsize=10)
    return fig


def plot_probes(results: dict[str, dict], path: Path) -> Path:
    """``draw_probes`` written to ``path``."""
    return save(draw_probes(results), path)
