"""ClipModule: open_clip's loss, distributed gathering, zero-shot and retrieval metrics."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ports import free_port

from lightning_registers.cli import close_process_group
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import ClipModule
from lightning_registers.objectives.clip import retrieval_recall, zeroshot_accuracy


def tiny_clip(**kwargs) -> ClipModule:
    torch.manual_seed(0)
    backbone = RegisterViT(
        "vit_tiny", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_registers=2
    )
    args = dict(
        num_classes=3,
        image_size=16,
        embed_dim=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        context_length=12,
    )
    args.update(kwargs)
    return ClipModule(backbone, **args)


def batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 400, (n, 12), generator=g)


def test_logit_scale_starts_at_log_one_over_007():
    assert tiny_clip().logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_loss_equals_the_symmetric_cross_entropy_by_hand():
    m = tiny_clip()
    m.configure_criterion()
    images, texts = batch(6)
    loss = m.contrastive_loss(images, texts)
    i = F.normalize(m.encode_image(images), dim=-1)
    t = F.normalize(m.encode_text(texts), dim=-1)
    logits = m.logit_scale.exp() * i @ t.T
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(loss, expected)


def test_siglip_option_uses_a_learnable_bias():
    m = tiny_clip(loss="siglip")
    m.configure_criterion()
    images, texts = batch(4)
    i = F.normalize(m.encode_image(images), dim=-1)
    t = F.normalize(m.encode_text(texts), dim=-1)
    logits = m.logit_scale.exp() * i @ t.T + m.logit_bias
    labels = 2 * torch.eye(4) - 1
    expected = -F.logsigmoid(labels * logits).sum() / 4
    torch.testing.assert_close(m.contrastive_loss(images, texts), expected)


def test_weight_decay_rules_of_the_clip_objective():
    from lightning_registers.objectives.optim import no_decay_names

    module = tiny_clip()
    tokens = no_decay_names(module, "tokens")  # the default: every embedding exempt
    for name in ["logit_scale", "text.token_embedding.weight", "backbone.pos_embed"]:
        assert name in tokens
    # open_clip_train decays every tensor of 2 or more dims, token and position embeddings too.
    names = no_decay_names(module, "open_clip")
    for name in [
        "logit_scale",
        "backbone.cls_token",
        "backbone.register_tokens",
        "text.ln_final.weight",
    ]:
        assert name in names  # fmt: skip
    for name in [
        "text.token_embedding.weight",
        "text.positional_embedding",
        "backbone.pos_embed",
        "image_projection.weight",
        "text.text_projection",
    ]:
        assert name not in names  # fmt: skip


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = tiny_clip()
    m.configure_criterion(rank, world)
    images, texts = batch(8)
    half = slice(4 * rank, 4 * rank + 4)
    loss = m.contrastive_loss(images[half], texts[half])
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    dist.all_reduce(grads)  # DDP averages gradients over ranks
    dist.all_reduce(loss.detach())
    if rank == 0:
        torch.save({"loss": loss.detach() / world, "grads": grads / world}, out)
    close_process_group()


def test_two_gloo_ranks_give_the_loss_and_gradients_of_the_whole_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_worker, args=(2, free_port(), out), nprocs=2, join=True)
    distributed = torch.load(out)

    m = tiny_clip()
    m.configure_criterion()
    images, texts = batch(8)
    loss = m.contrastive_loss(images, texts)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(distributed["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distributed["grads"], grads, rtol=1e-4, atol=1e-5)


def test_zeroshot_accuracy_by_hand():
    classifier = torch.eye(3)  # class c's text embedding is axis c
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1, -1])  # third is wrong, fourth has no label
    assert zeroshot_accuracy(images, classifier, labels) == pytest.approx(2 / 3)


def test_retrieval_recall_by_hand():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.1, 0.9], [0.0, 0.9, 0.1]])
    text = F.normalize(text, dim=-1)
    recall = retrieval_recall(image, text, ks=(1, 2))
    # image 0 -> text 0 (hit); image 1 -> text 2 first (miss @1, hit @2); image 2 -> text 1 first
    assert recall["image_to_text_r1"] == pytest.approx(1 / 3)
    assert recall["image_to_text_r2"] == pytest.approx(1.0)
    assert recall["text_to_image_r1"] == pytest.approx(1 / 3)


def test_text_tower_initializes_from_an_open_clip_checkpoint_file(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    reference = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(context_length=12, width=32, heads=2, layers=1),
    ).eval()
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    m = tiny_clip(text_checkpoint=str(path)).eval()
    _, texts = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(texts), reference.encode_text(texts))

    torch.save({"token_embedding.weight": torch.zeros(49408, 32)}, path)
    with pytest.raises(KeyError, match="ln_final"):
        tiny_clip(text_checkpoint=str(path))


@pytest.mark.parametrize("templates", ["simple", "openai"])
@torch.no_grad()
def test_zeroshot_classifier_averages_the_chosen_templates(templates):
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    m = tiny_clip(zeroshot_templates=templates).eval()
    expected_templates = {"simple": SIMPLE_IMAGENET_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}
    prompts = expected_templates[templates]
    assert len(prompts) == {"simple": 7, "openai": 80}[templates]
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=12)
    names = ["circle", "square"]
    expected = []
    for name in names:
        features = m.encode_text(tokenizer([t(name) for t in prompts]), normalize=True)
        expected.append(F.normalize(features.mean(0), dim=-1))
    torch.testing.assert_close(m.zeroshot_classifier(names), torch.stack(expected, dim=1))
