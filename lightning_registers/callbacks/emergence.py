"""Events when high-norm artifact tokens emerge or vanish during training."""

from __future__ import annotations

import json

import lightning as L
from lightning.pytorch.callbacks import Callback

from ..measures.norms import OUTPUT, RULES, OutlierRule
from .norms import TokenNormMonitor
from .probe import monitored_backbones, run_dir, tensorboard

EVENTS_FILE = "artifact_events.jsonl"


class ArtifactEmergence(Callback):
    """Follows a TokenNormMonitor's high-norm share of patch tokens at one layer. When it stays
    above ``level`` for ``patience`` checks in a row, artifacts have emerged; when it then stays
    at or below ``level`` for ``patience`` checks, they have vanished. Each event goes to
    TensorBoard as text (``artifacts/events``) and as a JSON line to
    ``<run dir>/artifact_events.jsonl``; the scalar ``artifacts/NAME/present`` is 1 while
    artifacts are present.

    Args:
        level: share of patch tokens (0..1) above which a check counts as "artifacts".
        patience: checks in a row that make an event.
        layer: the watched layer (``output`` or ``blockNN``).
        rule: ``relative`` (the scale-free rule) or ``absolute`` (the norm threshold).
    """

    def __init__(
        self, level: float = 0.01, patience: int = 3, layer: str = OUTPUT, rule: str = "relative"
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"ArtifactEmergence.rule must be one of {RULES}, got {rule!r}")
        if patience < 1:
            raise ValueError(f"ArtifactEmergence.patience must be >= 1, got {patience}")
        self.level = level
        self.patience = patience
        self.layer = layer
        self.key = OutlierRule(rule).share_key
        self.present: dict[str, bool] = {}
        self.streak: dict[str, list[int]] = {}
        self.events: list[dict] = []
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, TokenNormMonitor)]
        if not monitors:
            raise ValueError("ArtifactEmergence needs a TokenNormMonitor in trainer.callbacks")
        for backbone in monitored_backbones(pl_module).values():
            layers = monitors[0].layer_names(backbone.depth)
            if self.layer not in layers:
                raise ValueError(
                    f"ArtifactEmergence.layer {self.layer!r} is not watched by the "
                    f"TokenNormMonitor (layers: {', '.join(layers)})"
                )
        if self.update not in monitors[0].subscribers:
            monitors[0].subscribers.append(self.update)
        self.trainer = trainer

    def update(self, step: int, name: str, result: dict) -> dict | None:
        """Take one check's result for backbone ``name``; returns the event it makes, if any."""
        share = result["stats"][self.layer][self.key]
        present = self.present.get(name, False)
        streak = self.streak.setdefault(name, [])
        # A streak is the run of checks that disagree with the current state.
        streak[:] = [*streak, step] if (share > self.level) != present else []
        event = None
        if len(streak) >= self.patience:
            self.present[name] = present = not present
            event = {
                "event": "emerged" if present else "vanished",
                "step": step,
                "since_step": streak[0],
                "backbone": name,
                "layer": self.layer,
                "rule": self.key,
                "share": share,
                "level": self.level,
            }
            self.events.append(event)
            streak.clear()
        self._record(step, name, present, event)
        return event

    def _record(self, step: int, name: str, present: bool, event: dict | None) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_scalar(f"artifacts/{name}/present", float(present), step)
        if event is None:
            return
        text = (
            f"step {event['step']}: high-norm artifacts {event['event']} in {name} "
            f"({event['layer']}: {100 * event['share']:.2f}% of patch tokens by the "
            f"{event['rule']} rule, level {100 * self.level:g}%, {self.patience} checks in a "
            f"row since step {event['since_step']})"
        )
        if writer is not None:
            writer.add_text("artifacts/events", text, step)
        path = run_dir(trainer) / EVENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def state_dict(self) -> dict:
        return {"present": self.present, "streak": self.streak, "events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        self.present = dict(state_dict["present"])
        self.streak = {k: list(v) for k, v in state_dict["streak"].items()}
        self.events = list(state_dict["events"])
