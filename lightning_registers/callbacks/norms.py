"""Token-norm monitoring in TensorBoard: where high-norm artifact tokens appear (paper Fig. 3,
4, 5b)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from torch import nn

from ..measures.figures import (
    norm_map_grid,
    save_grid_png,
    save_norm_histograms_png,
    save_share_by_layer_png,
)
from ..measures.norms import (
    OUTPUT,
    RULES,
    TOKEN_KINDS,
    OutlierRule,
    high_norm_stats,
    layer_name,
)
from ..measures.placement import object_share
from ..measures.signature import SIGNATURE_KEYS, high_norm_signature, probe_forward
from .dashboard import STATUS, layer_charts, layout, logged_value, scalar_tag
from .probe import ProbeCallback, monitored_backbones, tensorboard

SHARE_KEYS = tuple(OutlierRule(kind).share_key for kind in RULES)


class Judge(Protocol):
    """What ``ArtifactEmergence`` is to a ``TokenNormMonitor``: it takes each check and says
    what it makes of it."""

    def update(self, step: int, name: str, result: dict) -> dict | None:
        """Take the check ``result`` of backbone ``name`` at ``step``."""

    def verdict(self, name: str) -> str:
        """The state of backbone ``name`` after its latest check, as a phrase."""

    def charts(self, name: str) -> dict[str, list[str]]:
        """Its custom-scalars charts for backbone ``name``, by title (tag patterns)."""


class TokenNormMonitor(ProbeCallback):
    """Token norms on a fixed probe batch, per layer and token kind, in TensorBoard.

    Logged per watched backbone NAME (``backbone``; DINO: ``student`` and ``teacher``) and
    LAYER (``blockNN``: the residual stream after block NN; ``output``: the final normalized
    tokens):

    - histograms ``token_norms/NAME/LAYER/{cls,registers,patches}``;
    - scalars ``artifacts/NAME/high_norm_share_absolute/LAYER`` (patch tokens with norm above
      ``threshold``, the paper's 150, in % of the patch tokens),
      ``artifacts/NAME/high_norm_share_relative/LAYER`` (above ``factor`` times the median
      patch norm of that layer on the probe batch, in %: a scale-free rule that judges small
      models with other norm scales fairly; 3 x median equals 150 for the paper's typical
      normal-token norm of 50) and ``artifacts/NAME/max_over_median/LAYER``;
    - the signature of the high-norm tokens by ``rule`` (what tells artifacts from
      look-alikes, ``measures.signature``), as scalars ``artifacts/NAME/KEY/LAYER``:
      ``onset_block`` (the block where this layer's high-norm tokens first appear; the output
      counts as block ``depth``), ``image_share_max`` (their largest share of one probe
      image's patches, %), ``background_share`` (their share on background patches, %,
      where the probe samples have object boxes), ``neighbour_cosine_high_norm`` and
      ``neighbour_cosine_normal`` (how alike each patch embedding is to its 4 neighbours, for
      them and for the other tokens) and ``cls_attention_on_high_norm`` (the share of the
      last-block [CLS] attention over the patches that lands on them, %); a key is left out at
      a check where it has nothing to measure;
    - text ``artifacts/NAME/status`` at every check: the largest high-norm share by ``rule``
      with its layer, the largest max/median norm with its layer, and the judges' verdicts
      (``ArtifactEmergence``);
    - images ``norm_maps/NAME``: each probe image beside its patch-norm maps at each of
      ``map_layers`` (``measures.figures.norm_map_grid``: norm / median on one colour scale
      with its colour bar, each column labelled with its layer's min, median and max norm);
    - once at the start of training, the custom-scalars layout ``Artifacts`` (the Custom
      Scalars tab): per backbone, a chart with a line per layer for the high-norm share by each
      rule and for max/median, and the judges' charts.

    Args:
        every_n_steps: cadence in optimizer steps.
        layers: block indices to watch (negative from the end); default every block. The
            final normalized output is always watched.
        threshold: absolute norm threshold of a high-norm token.
        factor: factor of the median norm for the scale-free rule.
        rule: the rule of the signature scalars, of the status and of ``ArtifactEmergence``:
            ``relative`` or ``absolute``.
        probe_size: validation images in the probe batch.
        n_images: probe images drawn in the norm-map grid.
        map_layers: layers drawn as norm maps; default the watched block in the middle of the
            network and the output.
        save_png: also write the figures as PNG files under ``<run dir>/figures/``.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        layers: list[int] | None = None,
        threshold: float = 150.0,
        factor: float = 3.0,
        rule: str = "relative",
        probe_size: int = 16,
        n_images: int = 4,
        map_layers: list[str] | None = None,
        save_png: bool = False,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"TokenNormMonitor.rule must be one of {RULES}, got {rule!r}")
        super().__init__(every_n_steps, probe_size, save_png)
        self.layers = layers
        self.threshold = threshold
        self.factor = factor
        self.rule = OutlierRule(rule, threshold, factor)
        self.n_images = n_images
        self.map_layers = map_layers
        self.judges: list[Judge] = []
        """Given each measurement after it is logged (``ArtifactEmergence``)."""

    def rules(self) -> dict[str, OutlierRule]:
        """The absolute and the relative rule of this monitor, by legend label; ``rule`` first."""
        rules = {
            f"norm > {self.threshold:g}": OutlierRule("absolute", self.threshold, self.factor),
            f"norm > {self.factor:g} x median": OutlierRule(
                "relative", self.threshold, self.factor
            ),
        }
        return dict(sorted(rules.items(), key=lambda item: item[1] != self.rule))

    def layer_names(self, depth: int) -> list[str]:
        """The layers watched in a backbone of ``depth`` blocks."""
        self._check_layers(depth)
        blocks = range(depth) if self.layers is None else sorted({i % depth for i in self.layers})
        return [layer_name(i) for i in blocks] + [OUTPUT]

    def _check_layers(self, depth: int) -> None:
        bad = [i for i in self.layers or [] if not -depth <= i < depth]
        if bad:
            raise ValueError(f"TokenNormMonitor.layers {bad} out of range for depth {depth}")

    def drawn_layers(self, depth: int) -> list[str]:
        """The layers drawn as norm maps in a backbone of ``depth`` blocks."""
        if self.map_layers is not None:
            return list(self.map_layers)
        blocks = self.layer_names(depth)[:-1]
        return [*blocks[len(blocks) // 2 :][:1], OUTPUT]

    def setup(self, trainer, pl_module, stage: str) -> None:
        for backbone in monitored_backbones(pl_module).values():
            names = self.layer_names(backbone.depth)
            unknown = [layer for layer in self.drawn_layers(backbone.depth) if layer not in names]
            if unknown:
                raise ValueError(
                    f"TokenNormMonitor.map_layers {unknown} are not watched layers {names}"
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_custom_scalars(self.dashboard(pl_module))
        super().on_train_start(trainer, pl_module)

    def dashboard(self, pl_module: L.LightningModule) -> dict:
        """The custom-scalars layout of the ``Artifacts`` dashboard for ``pl_module``."""
        charts = {}
        for name, backbone in monitored_backbones(pl_module).items():
            charts.update(layer_charts(name, self.layer_names(backbone.depth), self.rules()))
            for judge in self.judges:
                charts.update(judge.charts(name))
        return layout(charts)

    def measure(self, backbone: nn.Module, images: torch.Tensor) -> dict:
        blocks = range(backbone.depth) if self.layers is None else self.layers
        self._check_layers(backbone.depth)
        probed = probe_forward(backbone, images, blocks)
        patch_norms = {layer: kinds["patches"] for layer, kinds in probed["norms"].items()}
        stats = {
            layer: high_norm_stats(norms, self.threshold, self.factor)
            for layer, norms in patch_norms.items()
        }
        objects = self.probe_objects
        if objects is not None:
            objects = object_share(objects[: len(images)], backbone.patch_size)
        signature = high_norm_signature(
            patch_norms,
            backbone.depth,
            self.rule,
            probed["redundancy"],
            probed["attention"],
            objects,
        )
        return {
            "norms": probed["norms"],
            "stats": stats,
            "signature": signature,
            "rule": self.rule.kind,
            "depth": backbone.depth,
            "grid": tuple(probed["attention"].shape[-2:]),
        }

    def run(self, pl_module, step: int, writer=None) -> dict[str, dict]:
        results = super().run(pl_module, step, writer)
        for name, result in results.items():
            for judge in self.judges:
                judge.update(step, name, result)
            if writer is not None:
                writer.add_text(scalar_tag(name, STATUS), self.status(step, name, result), step)
        return results

    def status(self, step: int, name: str, result: dict) -> str:
        """One check of backbone ``name`` in a sentence: the judges' verdicts (else whether
        there are high-norm tokens at all), the largest share by ``rule`` and the largest
        max/median norm, each with its layer (on a tie the deepest, so the output where every
        layer has none)."""
        stats = result["stats"]

        def largest(key: str) -> tuple[float, str]:
            layer = max(reversed(list(stats)), key=lambda layer: stats[layer][key])
            return stats[layer][key], layer

        share, share_layer = largest(self.rule.share_key)
        ratio, ratio_layer = largest("max_over_median")
        verdicts = [judge.verdict(name) for judge in self.judges]
        if not verdicts:
            verdicts = ["high-norm tokens" if share else "no artifacts"]
        label = next(label for label, rule in self.rules().items() if rule == self.rule)
        return (
            f"{'; '.join(verdicts)}: largest share {100 * share:.3g} % at {share_layer} "
            f"({label}), max/median {ratio:.3g} at {ratio_layer}, {name}, step {step}"
        )

    def report(self, writer, name: str, result: dict, images: torch.Tensor, step: int) -> None:
        for layer, kinds in result["norms"].items():
            for kind in TOKEN_KINDS:
                if kinds[kind].numel():
                    writer.add_histogram(f"token_norms/{name}/{layer}/{kind}", kinds[kind], step)
            values = {**result["stats"][layer], **result["signature"][layer]}
            for key in (*SHARE_KEYS, "max_over_median", *SIGNATURE_KEYS):
                if values[key] is not None:
                    value = logged_value(key, values[key])
                    writer.add_scalar(scalar_tag(name, key, layer), value, step)
        writer.add_image(f"norm_maps/{name}", self.norm_map_grid(result, images), step)

    def norm_map_grid(self, result: dict, images: torch.Tensor) -> torch.Tensor:
        """Probe images beside their patch-norm maps at each of the ``drawn_layers``."""
        layers = self.drawn_layers(result["depth"])
        norms = {layer: result["norms"][layer]["patches"] for layer in layers}
        return norm_map_grid(images[: self.n_images], norms, result["grid"], self.factor)

    def save_figures(self, out_dir: str | Path, step: int | None = None) -> list[Path]:
        """Per backbone: norm histograms per layer, high-norm share by layer, norm maps."""
        out_dir = Path(out_dir)
        paths = []
        for name, result in self.results.items():
            step = result["step"] if step is None else step
            stem = f"{name}_step{step:07d}"
            patch_norms = {layer: kinds["patches"] for layer, kinds in result["norms"].items()}
            title = f"{name}, step {step}: patch-token norms"
            paths.append(
                save_norm_histograms_png(
                    patch_norms, self.threshold, out_dir / f"norm_hist_{stem}.png", title
                )
            )
            shares = {
                label: {layer: s[rule.share_key] for layer, s in result["stats"].items()}
                for label, rule in self.rules().items()
            }
            paths.append(
                save_share_by_layer_png(
                    shares, out_dir / f"high_norm_share_{stem}.png", f"{name}, step {step}"
                )
            )
            paths.append(
                save_grid_png(
                    self.norm_map_grid(result, self.probe),
                    [],
                    out_dir / f"norm_maps_{stem}.png",
                    f"{name}, step {step}: patch-token norms",
                )
            )
        return paths
