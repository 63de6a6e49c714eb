"""The paper configs, resolved by the CLI's own parser, hold the reference recipes value for
value (configs/README.md lists each value and its source); derived values (the learning rate
at a world size, open_clip's warmup in steps) computed by hand; every backbone the configs build
hands over to timm."""

import math
from types import SimpleNamespace

import pytest
import torch
from demo_run import ROOT, config_args, demo_data, write_yaml

from lightning_registers.cli import RegistersCLI, main
from lightning_registers.data import ShardDataModule
from lightning_registers.models import RegisterViT, build_timm_vit, create_timm_model
from lightning_registers.objectives import ObjectiveModule, load_objective
from lightning_registers.objectives.optim import peak_lr

DEIT = {
    "trainer.max_epochs": 240,
    "trainer.gradient_clip_val": None,
    "model.init_args.backbone.init_args.arch": "vit_base",
    "model.init_args.backbone.init_args.patch_size": 16,
    "model.init_args.backbone.init_args.layerscale_init": 1e-4,
    "model.init_args.backbone.init_args.drop_path_rate": 0.1,
    "model.init_args.backbone.init_args.drop_path_uniform": True,
    "model.init_args.backbone.init_args.qkv_bias": True,
    "model.init_args.backbone.init_args.norm_eps": 1e-6,
    "model.init_args.backbone.init_args.pre_norm": False,
    "model.init_args.head_pool": "cls",
    "model.init_args.mixup_alpha": 0.0,
    "model.init_args.cutmix_alpha": 1.0,
    "model.init_args.label_smoothing": 0.1,
    "model.init_args.bce_loss": False,
    "model.init_args.crop": "src",
    "model.init_args.color_jitter": 0.3,
    "model.init_args.blur": "pil",
    "model.init_args.eval_crop_ratio": 1.0,
    "model.init_args.optimizer": "lamb",
    "model.init_args.lr": 1e-3,
    "model.init_args.lr_scaling": None,
    "model.init_args.weight_decay": 0.02,
    "model.init_args.no_decay_rule": "tokens",
    "model.init_args.warmup_epochs": 5,
    "model.init_args.min_lr_ratio": 1e-2,
    "model.init_args.betas": (0.9, 0.999),
    "model.init_args.eps": 1e-8,
    "model.init_args.model_ema_decay": 0.99996,
    "data.image_size": 224,
    "data.batch_size": 64,
}
OPENCLIP = {
    "trainer.max_epochs": 32,
    "trainer.gradient_clip_val": None,
    "model.init_args.backbone.init_args.arch": "vit_base",
    "model.init_args.backbone.init_args.patch_size": 16,
    "model.init_args.backbone.init_args.pre_norm": True,
    "model.init_args.backbone.init_args.patch_bias": False,
    "model.init_args.backbone.init_args.norm_eps": 1e-5,
    "model.init_args.backbone.init_args.layerscale_init": None,
    "model.init_args.backbone.init_args.drop_path_rate": 0.0,
    "model.init_args.embed_dim": 512,
    "model.init_args.text_width": 512,
    "model.init_args.text_layers": 12,
    "model.init_args.text_heads": 8,
    "model.init_args.context_length": 77,
    "model.init_args.vocab_size": 49408,
    "model.init_args.tokenizer": "ViT-B-16",
    "model.init_args.loss": "clip",
    "model.init_args.local_loss": True,
    "model.init_args.gather_with_grad": True,
    "model.init_args.init_logit_scale": math.log(1 / 0.07),
    "model.init_args.optimizer": "adamw",
    "model.init_args.lr": 5e-4,
    "model.init_args.weight_decay": 0.2,
    "model.init_args.no_decay_rule": "open_clip",
    "model.init_args.min_lr_ratio": 0.0,
    "model.init_args.betas": (0.9, 0.98),
    "model.init_args.eps": 1e-6,
    "model.init_args.zeroshot_templates": "openai",
    "data.image_size": 224,
    "data.batch_size": 256,
}
DINOV2 = {
    "trainer.max_epochs": 500,
    "trainer.gradient_clip_val": 3.0,
    "model.init_args.backbone.init_args.arch": "vit_large",
    "model.init_args.backbone.init_args.patch_size": 14,
    "model.init_args.backbone.init_args.ffn": "swiglu",
    "model.init_args.backbone.init_args.layerscale_init": 1e-5,
    "model.init_args.backbone.init_args.drop_path_rate": 0.4,
    "model.init_args.backbone.init_args.drop_path_uniform": True,
    "model.init_args.backbone.init_args.qkv_bias": True,
    "model.init_args.backbone.init_args.interpolate_antialias": True,
    "model.init_args.backbone.init_args.interpolate_offset": 0.0,
    "model.init_args.image_size": 224,
    "model.init_args.local_crop_size": 98,
    "model.init_args.num_local_crops": 8,
    "model.init_args.global_crop_scale": (0.32, 1.0),
    "model.init_args.local_crop_scale": (0.05, 0.32),
    "model.init_args.mask_probability": 0.5,
    "model.init_args.mask_ratio": (0.1, 0.5),
    "model.init_args.stratified_masks": True,
    "model.init_args.blur_probabilities": (0.0, 0.9, 0.5),
    "model.init_args.n_prototypes": 131072,
    "model.init_args.head_hidden_dim": 2048,
    "model.init_args.head_bottleneck_dim": 384,
    "model.init_args.head_layers": 3,
    "model.init_args.prototype_init": "linear",
    "model.init_args.ibot_separate_head": True,
    "model.init_args.ibot_n_prototypes": 131072,
    "model.init_args.ibot_bottleneck_dim": 256,
    "model.init_args.dino_loss_weight": 1.0,
    "model.init_args.ibot_loss_weight": 1.0,
    "model.init_args.koleo_loss_weight": 0.1,
    "model.init_args.centering": "sinkhorn_knopp",
    "model.init_args.sinkhorn_iterations": 3,
    "model.init_args.student_temp": 0.1,
    "model.init_args.warmup_teacher_temp": 0.04,
    "model.init_args.teacher_temp": 0.07,
    "model.init_args.warmup_teacher_temp_epochs": 30,
    "model.init_args.momentum_teacher": 0.994,
    "model.init_args.final_momentum_teacher": 1.0,
    "model.init_args.lr": 2e-4,
    "model.init_args.lr_scaling": "sqrt",
    "model.init_args.lr_base_batch": 1024,
    "model.init_args.min_lr": 1e-6,
    "model.init_args.warmup_epochs": 80,
    "model.init_args.weight_decay": 0.04,
    "model.init_args.weight_decay_end": 0.2,
    "model.init_args.no_decay_rule": "dinov2",
    "model.init_args.layerwise_decay": 1.0,
    "model.init_args.patch_embed_lr_mult": 0.2,
    "model.init_args.freeze_last_layer_epochs": 1,
    "model.init_args.clip_grad_per_part": True,
    "model.init_args.betas": (0.9, 0.999),
    "model.init_args.eps": 1e-8,
    "data.batch_size": 32,
}
RECIPES = {
    "supervised/deit3_vit_b16": DEIT,
    "clip/openclip_vit_b16": OPENCLIP,
    "dino/vit_l14": DINOV2,
}
PAPER_CONFIGS = [f"{name}_reg{r}" for name in RECIPES for r in (4, 0)]


class ParsedCLI(RegistersCLI):
    """The CLI's ``fit`` up to its resolved configuration: nothing is instantiated or run."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def resolved(config: str, *args: str):
    cli = ParsedCLI(
        ObjectiveModule,
        ShardDataModule,
        subclass_mode_model=True,
        # Shards are only named: nothing is read.
        args=[
            "fit",
            *config_args(ROOT / "configs" / f"{config}.yaml"),
            "--data.train_urls=t.tar",
            "--data.val_urls=v.tar",
            *args,
        ],
    )
    return cli.config.fit


def value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return tuple(config) if isinstance(config, list) else config


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_config_resolves_to_the_reference_recipe(config):
    cfg = resolved(config)
    recipe = RECIPES[config.rsplit("_reg", 1)[0]]
    different = {
        key: (value(cfg, key), expected)
        for key, expected in recipe.items()
        if value(cfg, key) != pytest.approx(expected)
    }
    assert not different, f"{config}: (ours, reference) {different}"
    assert value(cfg, "model.init_args.backbone.init_args.num_registers") == int(config[-1])


def test_recipe_table_lists_every_checked_value():
    table = (ROOT / "configs" / "README.md").read_text()
    for recipe in RECIPES.values():
        for key in recipe:
            assert f"`{key.removeprefix('model.init_args.')}`" in table, key


@pytest.mark.parametrize(
    ("world_size", "expected"),
    # 32 per GPU: 2e-4 x sqrt(32 n / 1024) by hand.
    [(1, 2e-4 * math.sqrt(1 / 32)), (32, 2e-4), (64, 2e-4 * math.sqrt(2)), (128, 4e-4)],
)
def test_dinov2_learning_rate_follows_the_global_batch_of_the_run(world_size, expected):
    hparams = resolved("dino/vit_l14_reg4").model.init_args
    trainer = SimpleNamespace(
        world_size=world_size, accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=32)
    )
    assert peak_lr(hparams, trainer) == pytest.approx(expected, rel=1e-12)
    deit = resolved("supervised/deit3_vit_b16_reg4").model.init_args
    assert peak_lr(deit, trainer) == 1e-3  # --unscale-lr


def test_dinov2_epoch_is_1250_iterations_and_openclip_warms_up_2000_steps():
    dino = resolved("dino/vit_l14_reg4", "--trainer.num_nodes=8")
    assert dino.data.samples_per_epoch == 1250 * 32 * 64
    clip = resolved("clip/openclip_vit_b16_reg4")
    steps_per_epoch = clip.data.samples_per_epoch // (128 * 256)  # 16 nodes x 8 GPUs
    assert int(clip.model.init_args.warmup_epochs * steps_per_epoch) == 2000


@pytest.mark.parametrize("config", PAPER_CONFIGS)
@torch.no_grad()
def test_every_paper_backbone_hands_over_to_timm(config):
    """The backbone each config builds (two blocks, a 4 x 4 patch grid) and the timm model made
    from it compute the same tokens, also at another image size."""
    args = dict(value(resolved(config), "model.init_args.backbone.init_args"))
    side = args["patch_size"]
    backbone = RegisterViT(**{**args, "depth": 2, "img_size": 4 * side}).eval()
    gen = torch.Generator().manual_seed(0)
    for p in backbone.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    timm_model = create_timm_model(backbone).eval()
    x = torch.randn(2, 3, 4 * side, 6 * side, generator=gen)
    ours = backbone.forward_features(x)
    theirs = timm_model.forward_features(x)
    r = backbone.num_prefix_tokens
    for a, b in (
        (ours["x_norm_clstoken"], theirs[:, 0]),
        (ours["x_norm_patchtokens"], theirs[:, r:]),
    ):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_openclip_plain_vit_export_loads_into_the_timm_model_it_names(
    tmp_path, demo_shards, monkeypatch
):
    """A 1-step fit of the OpenCLIP baseline config (shrunk), exported with --layout timm: the
    recorded timm arguments (no_embed_class among them) build a model that loads it strictly."""
    monkeypatch.chdir(tmp_path)
    tiny = {
        "model": {"init_args": {
            "backbone": {"init_args": {
                "embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}},
            "embed_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2,
        }},
        "data": demo_data(demo_shards, num_classes=10),
    }  # fmt: skip
    overrides = write_yaml(tmp_path / "tiny.yaml", tiny)
    config = config_args(ROOT / "configs" / "clip" / "openclip_vit_b16_reg0.yaml")
    main(["fit", *config, "--config", str(overrides), "--trainer.max_steps=1",
          "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.callbacks=[]",
          "--experiment=export"])  # fmt: skip
    ckpt = tmp_path / "runs/export/version_0/checkpoints/last.ckpt"
    out = tmp_path / "backbone_timm.pt"
    main(["export", str(ckpt), "--out", str(out), "--layout", "timm"])
    exported = torch.load(out, weights_only=True)
    assert exported["timm"]["no_embed_class"] is False and exported["timm"]["pre_norm"] is True
    timm_model = build_timm_vit(exported["timm"]).eval()
    timm_model.load_state_dict(exported["state_dict"], strict=True)
    backbone = load_objective(ckpt).backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = backbone.forward_features(x)["x_norm_patchtokens"]
        theirs = timm_model.forward_features(x)[:, 1:]
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
