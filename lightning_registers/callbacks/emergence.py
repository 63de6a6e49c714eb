"""Events when high-norm artifact tokens emerge or vanish during training."""

from __future__ import annotations

import json

import lightning as L
from lightning.pytorch.callbacks import Callback

from ..measures.norms import OUTPUT, RULES
from ..measures.signature import ArtifactSignature
from .dashboard import PRESENT, scalar_tag
from .norms import TokenNormMonitor
from .probe import monitored_backbones, run_dir, tensorboard

EVENTS_FILE = "artifact_events.jsonl"
ANY_LAYER = "any"
EVENT_KEYS = (
    "share",
    "image_share_max",
    "onset_layer",
    "background_share",
    "neighbour_cosine_high_norm",
    "neighbour_cosine_normal",
    "cls_attention_on_high_norm",
)
FAILURES = {
    "few": "not few",
    "late": "from the first blocks on",
    "background": "on objects",
    "redundant": "not on redundant patches",
}
"""The ``ArtifactSignature`` conditions a layer fails, in words."""


class ArtifactEmergence(Callback):
    """Judges each check of a TokenNormMonitor: do the high-norm patch tokens look like the
    paper's artifacts rather than look-alikes? A check counts when, at the watched ``layer`` (or
    at any watched layer), the tokens are few (share above ``level``, at most ``max_level``
    over the probe images and in each one),
    appear beyond the first blocks (``min_onset``) and sit on redundant patches (on the
    background where the probe samples have object boxes, ``min_background``; else more alike
    their neighbours than the other tokens, ``min_redundancy_gap``): see
    ``measures.signature.ArtifactSignature``. When ``patience`` checks in a row count
    (persistent), artifacts have emerged; when ``patience`` checks in a row then do not, they
    have vanished.

    Each event goes to TensorBoard as text (``artifacts/events``) and as a JSON line to
    ``<run dir>/artifact_events.jsonl`` with the layer, its share, the layer where the tokens
    first appear, their share on the background, the neighbour similarity of them and of the
    other tokens, and the [CLS] attention on them; the scalar ``artifacts/NAME/present`` is 1
    while artifacts are present (a chart of the monitor's ``Artifacts`` dashboard), and the
    monitor's status text at every check starts with this judgement (``verdict``).

    Args:
        level: share of patch tokens (0..1) that a counting check must exceed.
        max_level: share a counting check may not exceed, over the probe images and in any
            one of them (artifacts are few: about 2 %).
        patience: checks in a row that make an event.
        layer: ``any`` (every layer the monitor watches; an event names the one with the
            largest share) or one layer (``output`` or ``blockNN``).
        rule: the high-norm rule, ``relative`` or ``absolute``; the monitor's ``rule`` by
            default, and it must be the monitor's.
        min_onset: the tokens must first appear at a block index of at least this fraction of
            the depth (0.25: not in the first quarter of the blocks).
        min_background: share of the tokens that must sit on background patches, where the
            probe samples have object boxes.
        min_redundancy_gap: where no box is known, the tokens' mean neighbour cosine must
            exceed that of the other patch tokens by more than this.
    """

    def __init__(
        self,
        level: float = 0.01,
        max_level: float = 0.10,
        patience: int = 3,
        layer: str = ANY_LAYER,
        rule: str | None = None,
        min_onset: float = 0.25,
        min_background: float = 0.5,
        min_redundancy_gap: float = 0.0,
    ) -> None:
        if rule is not None and rule not in RULES:
            raise ValueError(f"ArtifactEmergence.rule must be one of {RULES}, got {rule!r}")
        if patience < 1:
            raise ValueError(f"ArtifactEmergence.patience must be >= 1, got {patience}")
        if not 0 <= level < max_level <= 1:
            raise ValueError(
                f"ArtifactEmergence needs 0 <= level < max_level <= 1, got {level}, {max_level}"
            )
        if not 0 <= min_onset <= 1:
            raise ValueError(f"ArtifactEmergence.min_onset must lie in [0, 1], got {min_onset}")
        self.signature = ArtifactSignature(
            level, max_level, min_onset, min_background, min_redundancy_gap
        )
        self.level = level
        self.max_level = max_level
        self.patience = patience
        self.layer = layer
        self.rule = rule
        self.present: dict[str, bool] = {}
        self.streak: dict[str, list[int]] = {}
        self.emerged_at: dict[str, str] = {}
        """The layer named by each backbone's last emergence."""
        self.verdicts: dict[str, str] = {}
        self.events: list[dict] = []
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, TokenNormMonitor)]
        if not monitors:
            raise ValueError("ArtifactEmergence needs a TokenNormMonitor in trainer.callbacks")
        monitor = monitors[0]
        if self.rule is not None and self.rule != monitor.rule.kind:
            raise ValueError(
                f"ArtifactEmergence.rule {self.rule!r} differs from the TokenNormMonitor's rule "
                f"{monitor.rule.kind!r}: set TokenNormMonitor.rule"
            )
        for backbone in monitored_backbones(pl_module).values():
            layers = monitor.layer_names(backbone.depth)
            if self.layer != ANY_LAYER and self.layer not in layers:
                raise ValueError(
                    f"ArtifactEmergence.layer {self.layer!r} is not watched by the "
                    f"TokenNormMonitor (layers: {', '.join(layers)}; or {ANY_LAYER!r})"
                )
        if self not in monitor.judges:
            monitor.judges.append(self)
        self.trainer = trainer

    def judged_layers(self, signature: dict) -> list[str]:
        """The layers of a monitor result's ``signature`` that this judge looks at."""
        return list(signature) if self.layer == ANY_LAYER else [self.layer]

    def artifact_layer(self, result: dict) -> str | None:
        """The watched layer of a monitor ``result`` whose high-norm tokens look like artifacts
        (the one with the largest share where several do), or None."""
        signature = result["signature"]
        layers = self.judged_layers(signature)
        found = [
            layer
            for layer in layers
            if not self.signature.failures(signature[layer], result["depth"])
        ]
        return max(found, key=lambda layer: signature[layer]["share"], default=None)

    def update(self, step: int, name: str, result: dict) -> dict | None:
        """Take one check's result for backbone ``name``; returns the event it makes, if any."""
        found = self.artifact_layer(result)
        present = self.present.get(name, False)
        streak = self.streak.setdefault(name, [])
        # A streak is the run of checks that disagree with the current state.
        streak[:] = [*streak, step] if (found is not None) != present else []
        event = None
        if len(streak) >= self.patience:
            self.present[name] = present = not present
            if present:
                self.emerged_at[name] = found
            layer = self.emerged_at.get(name, OUTPUT)  # OUTPUT: a state saved without it
            stats = result["signature"][layer]
            event = {
                "event": "emerged" if present else "vanished",
                "step": step,
                "since_step": streak[0],
                "backbone": name,
                "layer": layer,
                "rule": result["rule"],
                **{key: stats[key] for key in EVENT_KEYS},
                "level": self.level,
                "max_level": self.max_level,
            }
            self.events.append(event)
            streak.clear()
        self.verdicts[name] = self._verdict(name, result, found, len(streak))
        self._record(step, name, present, event)
        return event

    def _verdict(self, name: str, result: dict, found: str | None, streak: int) -> str:
        if self.present.get(name, False):
            since = next(e["step"] for e in reversed(self.events) if e["backbone"] == name)
            state = f"artifacts present at {self.emerged_at[name]} since step {since}"
            return state + (f" (gone for {streak} of {self.patience} checks)" if streak else "")
        if found is not None:
            return f"no artifacts yet (like artifacts at {found} for {streak} of {self.patience})"
        signature = result["signature"]
        layers = reversed(self.judged_layers(signature))
        layer = max(layers, key=lambda layer: signature[layer]["share"])
        if signature[layer]["share"] == 0:
            return "no artifacts"
        failed = self.signature.failures(signature[layer], result["depth"])
        return f"no artifacts (at {layer}: {', '.join(FAILURES[f] for f in failed)})"

    def verdict(self, name: str) -> str:
        """The judgement of backbone ``name``'s latest check as a phrase (``no artifacts``, why
        not where there are high-norm tokens, or since when they are present)."""
        return self.verdicts.get(name, "not checked yet")

    def charts(self, name: str) -> dict[str, list[str]]:
        """The dashboard chart of backbone ``name``'s state: 1 while artifacts are present."""
        return {f"{name}: artifacts present (1) or not (0)": [f"^{scalar_tag(name, PRESENT)}$"]}

    def _record(self, step: int, name: str, present: bool, event: dict | None) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_scalar(scalar_tag(name, PRESENT), float(present), step)
        if event is None:
            return
        if writer is not None:
            writer.add_text("artifacts/events", self.describe(event), step)
        path = run_dir(trainer) / EVENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def describe(self, event: dict) -> str:
        """An event as one sentence."""

        def percent(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        return (
            f"step {event['step']}: high-norm artifacts {event['event']} in {event['backbone']} "
            f"({event['layer']}: {percent(event['share'])} of patch tokens by the "
            f"{event['rule']} rule, first at {event['onset_layer']}, "
            f"{percent(event['background_share'])} on background patches, neighbour cosine "
            f"{_number(event['neighbour_cosine_high_norm'])} against "
            f"{_number(event['neighbour_cosine_normal'])}, "
            f"{percent(event['cls_attention_on_high_norm'])} of the [CLS] attention; "
            f"{self.patience} checks in a row since step {event['since_step']})"
        )

    def state_dict(self) -> dict:
        return {
            "present": self.present,
            "streak": self.streak,
            "emerged_at": self.emerged_at,
            "events": self.events,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.present = dict(state_dict["present"])
        self.streak = {k: list(v) for k, v in state_dict["streak"].items()}
        self.emerged_at = dict(state_dict.get("emerged_at", {}))
        self.events = list(state_dict["events"])


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
