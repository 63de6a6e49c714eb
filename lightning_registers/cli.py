"""The ``lightning-registers`` command.

``fit``/``validate``/``test``/``predict`` are LightningCLI's, configured by YAML files
(``--config``, several merge in order); ``shards`` writes webdataset shards; ``export`` writes a
checkpoint's backbone as one file; ``analyze`` runs the paper's measurements on checkpoints;
``submit`` sends a fit to Slurm; ``curves`` draws the monitors' curves of runs; ``configs``
lists the shipped configs, which ``--config`` also takes by name (``--config demo/supervised``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .data import ShardDataModule, write_demo_shards, write_folder_shards, write_table_shards
from .data.datamodule import check_shard_urls
from .objectives import ObjectiveModule
from .objectives.checkpoint import check_training_checkpoint
from .objectives.safe_load import UntrustedCheckpointError, read_checkpoint
from .runs import RUNS_DIR, resume_checkpoint, run_version
from .shipped_configs import configs_main, expand_config_args

TRUST_HELP = (
    "also load a checkpoint that needs a full unpickler, which can run code: only one from a "
    "source you trust"
)


def fail(message: str) -> NoReturn:
    """End the command with a one-line error and exit code 2, as argparse does."""
    print(f"lightning-registers: error: {message}", file=sys.stderr)
    sys.exit(2)


class RegistersCLI(LightningCLI):
    """LightningCLI with the links between data and model, runs under
    ``runs/<experiment>/version_N/``, and every error known before work (missing shards, a value
    out of range, a checkpoint that does not load or is of another objective) as one line."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment",
            default="default",
            help="run name: TensorBoard runs go to runs/<experiment>/version_N",
        )
        parser.add_argument(
            "--version",
            type=int | None,
            default=None,
            help="run version to write to (default: the next free one, or the run that "
            "--ckpt_path belongs to, so that a resumed run continues in the same directory)",
        )
        parser.link_arguments("data.image_size", "model.init_args.image_size")
        parser.link_arguments("data.image_size", "model.init_args.backbone.init_args.img_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes")

    def parse_arguments(self, parser, args) -> None:
        # Checked here, before LightningCLI reads a checkpoint's hyperparameters into the config.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            try:
                check_shard_urls(subcommand, self.config[subcommand].data)
                select_checkpoint(self.config[subcommand])
            except (FileNotFoundError, ValueError) as exn:
                fail(str(exn))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters into the config with
        # weights_only=True whatever --weights_only says: a trusted checkpoint keeps the config's.
        if self.config[self.config.subcommand].get("weights_only") is not False:
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            version = config.version
            if version is None:
                version = run_version(config.get("ckpt_path"), config.experiment)
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": config.experiment, "version": version},
            }

    def instantiate_classes(self) -> None:
        # jsonargparse wraps what a constructor raises; a ValueError there is a value out of range.
        try:
            super().instantiate_classes()
        except (FileNotFoundError, ValueError) as exn:
            cause = exn
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if not isinstance(cause, FileNotFoundError | ValueError):
                raise
            fail(str(cause))

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and log_dir:
            log_dir = Path(log_dir)
            print(f"\nrun directory: {log_dir}")
            print(f"checkpoints:   {log_dir / 'checkpoints'}")
            print(f"watch it with: tensorboard --logdir {log_dir.parent}")


def select_checkpoint(config) -> None:
    """Settle ``ckpt_path`` of a subcommand's ``config`` before anything is built: ``last``
    becomes the newest checkpoint that loads (see ``runs.resume_checkpoint``), or None (a new
    run) where no run has one; a local checkpoint must load with ``weights_only`` (True unless
    the user passes ``--weights_only false``) and be of the configured objective."""
    if config.get("weights_only", False) is None:
        config.weights_only = True  # Lightning leaves it to torch, which before 2.6 trusts all
    trusted = config.get("weights_only") is False
    ckpt_path = str(config.ckpt_path or "")
    if ckpt_path in ("", "best", "hpc") or ckpt_path.lower().startswith("registry"):
        return  # nothing to check, or Lightning's keys for what it keeps track of itself
    if "://" in ckpt_path:
        return  # a remote file: Lightning reads it (with weights_only)

    def load(path) -> dict:
        try:
            return read_checkpoint(path, trusted)
        except UntrustedCheckpointError as exn:
            raise UntrustedCheckpointError(exn.path, exn.reason, "--weights_only false") from None

    if ckpt_path == "last":
        found = resume_checkpoint(config.experiment, config.version, load)
        if found is None:
            rank_zero_warn(
                f"--ckpt_path last: no run of {config.experiment!r} has a checkpoint; "
                "starting a new run"
            )
            config.ckpt_path = None
            return
        config.version, path, checkpoint = found
        config.ckpt_path = str(path)
        rank_zero_info(f"resuming from {path}")
    else:
        path, checkpoint = ckpt_path, load(ckpt_path)
    check_training_checkpoint(checkpoint, path, config.model.class_path)


def lightning_main(args: list[str] | None = None) -> RegistersCLI:
    """Run LightningCLI's subcommands (``args`` default to the command line)."""
    return RegistersCLI(
        ObjectiveModule,
        ShardDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={
            "description": "Train register ViTs. Also: `lightning-registers shards -h` to write "
            "webdataset shards."
        },
    )


def shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-registers shards", description="Write webdataset shards."
    )
    sub = parser.add_subparsers(dest="source", required=True)

    def writer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
        p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="the generated scene dataset (train/ and val/)")
    demo.add_argument("--out", default="data/demo")
    demo.add_argument("--train", type=int, default=20000, help="training scenes")
    demo.add_argument("--val", type=int, default=2000, help="validation scenes")
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (<= 224)")
    demo.add_argument("--seed", type=int, default=0)
    writer_options(demo)

    folder = sub.add_parser("from-folder", help="an ImageFolder tree: one sub-folder a class")
    folder.add_argument("root")
    folder.add_argument("--out", required=True)
    folder.add_argument("--prefix", default="shard")
    writer_options(folder)

    table = sub.add_parser("from-csv", help="a CSV or JSONL table of image paths and captions")
    table.add_argument("file")
    table.add_argument("--out", required=True)
    table.add_argument("--image-column", default="filepath")
    table.add_argument("--caption-column", default="caption")
    table.add_argument("--label-column", default=None)
    table.add_argument("--prefix", default="shard")
    writer_options(table)
    return parser


def shards_main(args: list[str]) -> None:
    """``lightning-registers shards ...``."""
    opts = shards_parser().parse_args(args)
    common = dict(maxcount=opts.maxcount, maxsize=opts.maxsize, progress=not opts.quiet)
    if opts.source == "demo":
        summary = write_demo_shards(opts.out, opts.train, opts.val, opts.size, opts.seed, **common)
    elif opts.source == "from-folder":
        summary = write_folder_shards(opts.root, opts.out, opts.prefix, **common)
    else:
        summary = write_table_shards(
            opts.file,
            opts.out,
            opts.image_column,
            opts.caption_column,
            opts.label_column,
            opts.prefix,
            **common,
        )
    print(summary)


def export_main(args: list[str]) -> None:
    """``lightning-registers export CHECKPOINT --out FILE``."""
    from .objectives.checkpoint import EXPORT_LAYOUTS, export_backbone

    parser = argparse.ArgumentParser(
        prog="lightning-registers export",
        description="Write a checkpoint's backbone (single file or sharded FSDP2 directory) as "
        "one consolidated file for inference and analysis.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.add_argument(
        "--part", default=None, help="which backbone: student or teacher (DINO; default teacher)"
    )
    parser.add_argument("--layout", default="ours", choices=EXPORT_LAYOUTS)
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    opts = parser.parse_args(args)
    try:
        out = export_backbone(
            opts.checkpoint, opts.out, opts.part, opts.layout, opts.trust_checkpoint
        )
    except ValueError as exn:
        fail(str(exn))
    print(f"wrote {out}")


def settings_arguments(parser: argparse.ArgumentParser, settings: type, allowed: dict) -> None:
    """One flag per field of the dataclass ``settings`` (``--lost-k`` for ``lost_k``), with
    the field's default and type, its values from ``allowed`` and its help from the class
    docstring's ``Args``: the dataclass is the one source of the defaults."""
    helps = docstring_args(settings)
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), None)
        kind = kind or hints[field.name]
        options = {"default": field.default, "help": helps.get(field.name)}
        if kind is bool:
            optional = field.default is None
            options["action"] = argparse.BooleanOptionalAction if optional else "store_true"
        else:
            options.update(type=kind, choices=allowed.get(field.name))
        parser.add_argument("--" + field.name.replace("_", "-"), **options)


def docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of ``cls``'s docstring, by name, each on one line."""
    helps: dict[str, str] = {}
    name = None
    for line in inspect.getdoc(cls).partition("Args:")[2].splitlines():
        if match := re.match(r"    (\w+): (.*)", line):
            name, helps[match[1]] = match[1], match[2]
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


def analyze_parser() -> argparse.ArgumentParser:
    from .analysis.settings import ALLOWED, AnalysisSettings
    from .models import LAYOUTS

    parser = argparse.ArgumentParser(
        prog="lightning-registers analyze",
        description="The paper's measurements on checkpoints: figures, summary.json and "
        "summary.md in --out.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file or sharded directory, or a released model by name from the local "
        "caches: timm:NAME, hf-hub:REPO, dinov2:NAME, open_clip:ARCH/TAG",
    )
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="PATH", help="more checkpoints, side by side"
    )
    parser.add_argument(
        "--format",
        nargs="+",
        default=["ours"],
        choices=LAYOUTS,
        help="checkpoint format: one for all, or one per checkpoint (--checkpoint first); "
        "a name sets its own",
    )
    parser.add_argument("--images", required=True, help="shard URLs/patterns or an image folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=256, help="images analysed at most")
    parser.add_argument("--image-size", type=int, default=None, help="default: training size")
    parser.add_argument("--part", default=None, help="DINO: teacher (default) or student")
    parser.add_argument("--num-heads", type=int, default=None, help="heads of released weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    settings_arguments(parser, AnalysisSettings, ALLOWED)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return parser


def analyze_main(args: list[str]) -> None:
    """``lightning-registers analyze --checkpoint PATH --images SOURCE --out DIR ...``."""
    from dataclasses import fields

    from .analysis import AnalysisSettings, analyze, load_backbone

    parser = analyze_parser()
    opts = parser.parse_args(args)
    paths = [opts.checkpoint, *opts.compare]
    formats = opts.format * len(paths) if len(opts.format) == 1 else opts.format
    if len(formats) != len(paths):
        parser.error(f"--format: give one format or {len(paths)}, got {len(opts.format)}")
    try:
        given = vars(opts)  # every option named as a settings field
        settings = AnalysisSettings(
            **{f.name: given[f.name] for f in fields(AnalysisSettings) if f.name in given}
        )
    except ValueError as exn:
        parser.error(str(exn))
    # Every checkpoint loads (or fails) before any image is read.
    try:
        backbones = [
            load_backbone(path, fmt, opts.part, opts.num_heads, trusted=opts.trust_checkpoint)
            for path, fmt in zip(paths, formats, strict=True)
        ]
    except (ValueError, KeyError) as exn:  # KeyError: CheckpointMismatchError names the keys
        parser.error(str(exn))
    analyze(
        backbones,
        opts.images,
        opts.out,
        settings,
        opts.num_images,
        opts.image_size,
        opts.device,
        progress=not opts.quiet,
    )
    print(f"wrote {Path(opts.out) / 'summary.md'} and {Path(opts.out) / 'summary.json'}")


def submit_main(args: list[str]) -> None:
    """``lightning-registers submit ...`` (see ``lightning_registers.slurm``)."""
    from .slurm import submit_main as submit

    submit(args)


def curves_main(args: list[str]) -> None:
    """``lightning-registers curves RUN_DIR... --out DIR`` (see ``analysis.curves``)."""
    from .analysis.curves import curves_main as curves

    curves(args)


def close_process_group() -> None:
    """End a distributed run: close the process group and leave without running C++ static
    destructors, where gloo's threads otherwise abort the process now and then (SIGABRT, exit
    code -6, after a successful run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


COMMANDS = {
    "shards": shards_main,
    "export": export_main,
    "analyze": analyze_main,
    "submit": submit_main,
    "curves": curves_main,
    "configs": configs_main,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-registers`` command."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            expanded = expand_config_args(args)
            if argv is None:  # LightningCLI reads the command line itself (and warns if given it)
                sys.argv[1:] = expanded
                lightning_main()
            else:
                lightning_main(expanded)
            close_process_group()
    except FileNotFoundError as exn:
        # Missing shards or input files are the user's to fix: no traceback.
        fail(str(exn))


if __name__ == "__main__":
    main()
