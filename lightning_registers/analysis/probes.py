"""What single tokens hold, by linear probes trained on half of the images and scored on the
other half, high-norm against normal tokens: the patch's position and its pixels (paper Fig. 7),
and the image's class from one token (Fig. 8).

The position and pixel probes train on a fixed random ``MAX_TOKENS`` of the training images'
patch tokens and are scored on every token of the test images, both gathered as the images
pass by (``ProbeTokens``, ``PatchProbes``): what is kept is those training tokens and a few
numbers per test token, however many images there are.

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


MAX_TOKENS = 20000  # training tokens of the position and pixel probes at most


def _sample(n: int, limit: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


def _by_kind(values: torch.Tensor, high_norm: torch.Tensor) -> dict:
    return {
        "normal": values[~high_norm].mean().item() if (~high_norm).any() else None,
        "high_norm": values[high_norm].mean().item() if high_norm.any() else None,
    }


def patch_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each patch's pixels, (N, P, 3 * patch_size**2), patches in row-major order."""
    return F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2)


def _row_col(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row and column (M, 2) of each patch ``index`` (M,) on the ``grid``."""
    return torch.stack([index // grid[1], index % grid[1]], -1).float()


class ProbeTokens:
    """The tokens the position and pixel probes are fitted on, gathered as the images pass by:
    a fixed random ``max_tokens`` (default ``MAX_TOKENS``) of the patch tokens of the training
    images (``image_split``), with their positions and pixels. Which tokens does not depend on
    how the images are batched; only they are kept.

    Attributes:
        train: the training images; test: the test images.
        positions: (K,) each token's patch index.
        features: (K, D) the tokens; pixels: (K, 3 * patch_size**2) their patches' pixels (once
            ``add`` has seen them).
    """

    def __init__(self, num_images: int, num_patches: int, max_tokens: int | None = None) -> None:
        self.train, self.test = image_split(num_images)
        self.num_patches = num_patches
        limit = max_tokens or MAX_TOKENS
        keep = _sample(len(self.train) * num_patches, limit)  # indices of train tokens
        self.positions = keep % num_patches
        self._slots = torch.argsort(keep)  # the tokens in the order the images come
        self._sorted = keep[self._slots]
        self._rank = torch.full((num_images,), -1)  # an image's place among the training ones
        self._rank[self.train] = torch.arange(len(self.train))
        self.features: torch.Tensor | None = None
        self.pixels: torch.Tensor | None = None

    def add(self, start: int, patches: torch.Tensor, pixels: torch.Tensor | None = None) -> None:
        """Keep the chosen tokens of images ``start``... (``patches`` (B, P, D), and their
        ``pixels`` (B, P, C) where the pixel probe is wanted)."""
        if self.features is None:
            self.features = patches.new_zeros(len(self._slots), patches.shape[-1])
            if pixels is not None:
                self.pixels = pixels.new_zeros(len(self._slots), pixels.shape[-1])
        for i, rank in enumerate(self._rank[start : start + len(patches)].tolist()):
            if rank < 0:
                continue
            first = rank * self.num_patches
            lo, hi = torch.searchsorted(
                self._sorted, torch.tensor([first, first + self.num_patches])
            )
            slots, tokens = self._slots[lo:hi], self._sorted[lo:hi] - first
            self.features[slots] = patches[i, tokens].to(self.features)
            if self.pixels is not None:
                self.pixels[slots] = pixels[i, tokens].to(self.pixels)


class PatchProbes:
    """The position probe (softmax regression over the ``grid``'s patches, unless
    ``position`` is False) and, where the tokens carry pixels, the pixel probe (ridge
    regression), fitted on ``tokens`` standardized by their own mean and std, on ``device``;
    ``score`` applies them to test tokens."""

    def __init__(
        self,
        tokens: ProbeTokens,
        grid: tuple[int, int],
        device: str | torch.device = "cpu",
        position: bool = True,
    ) -> None:
        self.grid, self.device = grid, device
        x = tokens.features.to(device)
        self.mean, self.std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # as standardize
        x = (x - self.mean) / self.std
        self.position = None
        if position:
            positions = tokens.positions.to(device)
            self.position = fit_softmax_regression(x, positions, tokens.num_patches)
        self.ridge = None if tokens.pixels is None else fit_ridge(x, tokens.pixels.to(device))

    def score(self, patches: torch.Tensor, pixels: torch.Tensor | None = None) -> dict:
        """Per test token of ``patches`` (B, P, D), flattened: ``top1`` (1 where the position
        probe finds the patch), ``distance`` (patches from the true position) and, with the
        ``pixels`` (B, P, C) and a pixel probe, ``l2`` (error of the reconstructed pixels)."""
        n, p, d = patches.shape
        x = (patches.reshape(-1, d).to(self.device) - self.mean) / self.std
        out = {}
        if self.position is not None:
            predicted = self.position(x).argmax(-1).cpu()
            truth = torch.arange(p).expand(n, p).reshape(-1)
            out["top1"] = (predicted == truth).float()
            offset = _row_col(predicted, self.grid) - _row_col(truth, self.grid)
            out["distance"] = offset.norm(dim=-1)
        if self.ridge is not None and pixels is not None:
            weight, bias = self.ridge
            target = pixels.reshape(-1, pixels.shape[-1]).to(self.device)
            out["l2"] = (x @ weight + bias - target).norm(dim=-1).cpu()
        return out


def probe_summary(scores: dict[str, torch.Tensor], high_norm: torch.Tensor) -> dict:
    """The ``position`` and ``pixels`` results (None where not scored) from
    ``PatchProbes.score``'s per-token ``scores`` of the test tokens and their ``high_norm``
    flags, normal against high-norm."""
    counts = {"normal": int((~high_norm).sum()), "high_norm": int(high_norm.sum())}
    position = None
    if "top1" in scores:
        position = {
            "top1": _by_kind(scores["top1"], high_norm),
            "distance": _by_kind(scores["distance"], high_norm),
            "test_tokens": counts,
        }
    pixels = {"l2": _by_kind(scores["l2"], high_norm)} if "l2" in scores else None
    return {"position": position, "pixels": pixels}


def _probe_in_memory(patches, grid, high_norm, max_tokens, device, images=None, patch_size=0):
    tokens = ProbeTokens(len(patches), patches.shape[1], max_tokens)
    pixels = None if images is None else patch_pixels(images, patch_size)
    tokens.add(0, patches, pixels)
    probes = PatchProbes(tokens, grid, device, position=pixels is None)
    test = tokens.test
    scores = probes.score(patches[test], None if pixels is None else pixels[test])
    return probe_summary(scores, high_norm[test].reshape(-1))


def position_probe(
    patches: torch.Tensor,
    grid: tuple[int, int],
    high_norm: torch.Tensor,
    max_tokens: int = MAX_TOKENS,
    device: str | torch.device = "cpu",
) -> dict:
    """Predict each patch token's position (one of h x w classes) from the token alone:
    ``top1`` accuracy and mean ``distance`` (in patches) to the true position, for normal and
    high-norm test tokens. The probe is fitted on ``device``."""
    return _probe_in_memory(patches, grid, high_norm, max_tokens, device)["position"]


def pixel_probe(
    patches: torch.Tensor,
    images: torch.Tensor,
    patch_size: int,
    high_norm: torch.Tensor,
    max_tokens: int = MAX_TOKENS,
    device: str | torch.device = "cpu",
) -> dict:
    """Reconstruct each patch's (normalized) pixels from its token by ridge regression (fitted
    on ``device``): mean L2 error per token for normal and high-norm test tokens."""
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    summary = _probe_in_memory(patches, grid, high_norm, max_tokens, device, images, patch_size)
    return summary["pixels"]


def classification_picks(high_norm: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """The tokens the class probe reads besides [CLS]: per image a random ``normal`` and a
    random ``high_norm`` patch token (index, -1 where the image has none), drawn once for all
    images; None without two labelled classes."""
    if labels[labels >= 0].unique().numel() < 2:
        return None
    generator = torch.Generator().manual_seed(0)

    def pick(flags: torch.Tensor) -> torch.Tensor:
        scores = torch.rand(flags.shape, generator=generator).masked_fill(~flags, -1)
        return torch.where(flags.any(dim=1), scores.argmax(dim=1), -1)

    return {"normal": pick(~high_norm), "high_norm": pick(high_norm)}


def picked_tokens(patches: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """The token ``choice`` (B,) of each image of ``patches`` (B, P, D) (its first where none)."""
    return patches[torch.arange(len(patches)), choice.clamp_min(0)]


def classify_picked(
    cls: torch.Tensor,
    picks: dict[str, torch.Tensor],
    picked: dict[str, torch.Tensor],
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
) -> dict:
    """The class probe of ``token_classification`` on [CLS] ``cls`` (N, D) and on the tokens
    ``picked`` (N, D) at ``picks`` (``classification_picks``)."""
    known = labels >= 0
    train, test = image_split(len(labels))
    out = {}
    for kind in ("cls", *picks):
        if kind == "cls":
            usable, features = known, cls
        else:
            usable, features = known & (picks[kind] >= 0), picked[kind]
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
    picks = classification_picks(high_norm, labels)
    if picks is None:
        return None
    picked = {kind: picked_tokens(patches, choice) for kind, choice in picks.items()}
    return classify_picked(cls, picks, picked, labels, device)


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
