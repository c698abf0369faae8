"""ViT backbones with LoRA and the MAE pretext in the vision recipe (``model.backbone=vit``).

- The split qkv equals timm's fused layer; LoRA starts as the identity; the parameters are the
  adapters only (the base weights are buffers), and ``base_trainable`` exposes them for the
  pretext stage and hides them again.
- MAE: the masking ratio is respected per image, the loss reads the masked patches only, and it
  decreases on a tiny run.
- The LoRA-coupled bilevel problem's hypergradient over the adapters equals a dense float64 solve.
- A BiSSL stage leaves the frozen backbone unchanged; the whole pipeline runs (slow).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("peft")

from implicitbilevel import BilevelProblem, Dense, ImplicitJacobian, ProximalL2  # noqa: E402
from implicitbilevel.bissl import bissl_upper_loss  # noqa: E402
from implicitbilevel.bissl.checkpoint import load_checkpoint  # noqa: E402
from recipes.vision.init import load_backbone_init  # noqa: E402
from recipes.vision.mae import (  # noqa: E402
    MAEPretext,
    MaskedBatches,
    keep_count,
    mae_bissl_losses,
    patchify,
    pretrain_mae,
)
from recipes.vision.models import Downstream  # noqa: E402
from recipes.vision.vit import (  # noqa: E402
    SplitQKV,
    add_lora,
    base_trainable,
    build_vit,
    vit_init_state,
)
from tests.reference import dense_hessian, flat  # noqa: E402

D64 = torch.float64


def tiny_vit(image=8, patch=4, width=8, rank=2, dtype=torch.float32):
    torch.manual_seed(0)
    net = add_lora(build_vit(image, patch=patch, depth=1, width=width, heads=2), rank, ["q", "v"])
    return net.to(dtype)


def test_split_qkv_equals_fused_and_lora_starts_as_identity():
    fused = torch.nn.Linear(8, 24)
    x = torch.randn(3, 5, 8)
    assert torch.allclose(SplitQKV(fused)(x), fused(x), atol=1e-6)
    torch.manual_seed(0)
    plain = build_vit(8, patch=4, depth=1, width=8, heads=2)
    images = torch.randn(2, 3, 8, 8)
    before = plain(images)
    net = add_lora(plain, 2, ["q", "v"])
    assert torch.allclose(net(images), before, atol=1e-6)
    names = [n for n, _ in net.named_parameters()]
    assert names and all("lora_" in n and (".q." in n or ".v." in n) for n in names)
    assert "blocks.0.attn.qkv.q.base_layer.weight" in net.state_dict()
    with base_trainable(net):
        assert "blocks.0.attn.qkv.q.base_layer.weight" in dict(net.named_parameters())
    assert [n for n, _ in net.named_parameters()] == names
    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(build_vit(8, patch=4, depth=1, width=8, heads=2), 2, ["query"])


def test_a_timm_vit_checkpoint_loads_onto_the_split_lora_layout():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    ref = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                            num_classes=10).eval()
    net = tiny_vit()
    load_backbone_init(net, vit_init_state(net, ref.state_dict()), "timm")
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(ref.forward_head(ref.forward_features(x), pre_logits=True), net(x),
                          atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_mae_masks_the_configured_ratio_and_scores_only_masked_patches(ratio):
    model = MAEPretext(tiny_vit(image=16), 16, mask_ratio=ratio)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    keep, restore, mask = model.masks(noise)
    assert keep.shape == (4, keep_count(16, ratio))
    assert keep_count(16, ratio) == round(16 * (1 - ratio))
    assert torch.equal(mask.sum(1), torch.full((4,), 16.0 - keep.shape[1]))
    assert all(mask[i, keep[i]].sum() == 0 for i in range(4))
    images = torch.randn(4, 3, 16, 16)
    target = patchify(images, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()

    def oracle(latent, restore_):  # exact on masked patches, wrong on the visible ones
        return torch.where(mask.bool().unsqueeze(-1), target, target + 5.0)

    model.decoder.forward = oracle
    assert float(model(images, noise)) < 1e-10
    model.decoder.forward = lambda latent, restore_: torch.where(
        mask.bool().unsqueeze(-1), target + 1.0, target)
    assert float(model(images, noise)) == pytest.approx(1.0, rel=1e-6)


def test_mae_loss_decreases_on_a_tiny_run():
    torch.manual_seed(0)
    images = torch.rand(32, 3, 16, 16)
    loader = [(images[i:i + 16], images[i:i + 16]) for i in (0, 16)]
    model = MAEPretext(tiny_vit(image=16, width=16), 16, mask_ratio=0.5)
    with base_trainable(model.backbone):
        losses = pretrain_mae(model, MaskedBatches(loader, 16, seed=0), epochs=30, lr=3e-3,
                              weight_decay=0.0, device=torch.device("cpu"))
    assert losses[-1] < 0.8 * losses[0]


def _problem(lam=0.5, damping=0.0):
    pretext = MAEPretext(tiny_vit(dtype=D64), 8, mask_ratio=0.5, decoder_dim=8).to(D64)
    torch.manual_seed(1)
    with torch.no_grad():  # adapters away from B = 0, so the curvature over them is not trivial
        for p in pretext.parameters():
            p.add_(0.3 * torch.randn_like(p))
    downstream = Downstream(copy.deepcopy(pretext.backbone), 3).to(D64)
    with torch.no_grad():
        for n, p in downstream.named_parameters():
            if n.startswith("backbone."):
                p.add_(0.1 * torch.randn_like(p))
    losses = mae_bissl_losses(pretext, downstream)
    problem = BilevelProblem(bissl_upper_loss(losses.downstream, losses.backbone),
                             losses.pretext, regularizer=ProximalL2(losses.backbone), lam=lam,
                             ij=ImplicitJacobian(Dense(), damping=damping))
    return pretext, downstream, losses, problem


def test_lora_coupled_hypergradient_matches_a_dense_solve():
    lam = 0.5
    pretext, downstream, losses, problem = _problem(lam)
    assert losses.backbone and all("lora_" in n for n in losses.backbone)
    g = torch.Generator().manual_seed(2)
    lower_batch = (torch.randn(4, 3, 8, 8, generator=g, dtype=D64), torch.rand(4, 4, generator=g))
    upper_batch = (torch.randn(5, 3, 8, 8, generator=g, dtype=D64),
                   torch.randint(0, 3, (5,), generator=g))
    upper = {n: p.detach().clone() for n, p in downstream.named_parameters()}
    lower = {n: p.detach().clone() for n, p in pretext.named_parameters()}
    grads = problem.upper_grad(upper, lower, upper_batch, lower_batch).grads

    names = losses.backbone
    theta_p = {n: lower[n] for n in names}

    def lower_of_theta(th):  # the pretext loss plus λ/2 ‖θ_D − θ_P‖² over the adapters
        prox = sum(((upper[n] - th[n]) ** 2).sum() for n in names)
        return losses.pretext({**lower, **th}, lower_batch) + 0.5 * lam * prox

    h = dense_hessian(lower_of_theta, theta_p)  # = H + λI
    params_p = {n: theta_p[n].clone().requires_grad_() for n in names}
    v = torch.autograd.grad(losses.downstream({**upper, **params_p}, upper_batch),
                            list(params_p.values()))
    params_d = {n: upper[n].clone().requires_grad_() for n in names}
    direct = torch.autograd.grad(losses.downstream({**upper, **params_d}, upper_batch),
                                 list(params_d.values()))
    expected = lam * torch.linalg.solve(h, flat(dict(zip(names, v)))) + flat(
        dict(zip(names, direct)))
    got = flat({n: grads[n] for n in names})
    assert float((got - expected).norm() / expected.norm()) < 1e-8


@pytest.mark.slow
def test_vit_pipeline_runs_end_to_end_and_keeps_the_frozen_backbone(tmp_path):
    from recipes.vision_bissl import main

    out = tmp_path / "run"
    sets = ["run.out_dir=" + str(out), "pretext.epochs=2", "pretext.warmup_epochs=1",
            "finetune.epochs=1", "finetune.search_trials=1", "finetune.search_epochs=1",
            "finetune.seeds=[0]", "warmup.epochs=1", "bissl.alternations=2",
            "bissl.lower_steps=2", "bissl.upper_steps=1", "bissl.mfac_m=3",
            "data.digits_pretext=200", "data.digits_train=64", "data.digits_val=64",
            "bissl.lower_warmup_alternations=0"]
    args = ["--config", "recipes/configs/vision_vit_embedded.yaml"]
    for s in sets:
        args += ["--set", s]
    main(["pretext", "only-ft", "head-warmup", *args])
    before = load_checkpoint(out / "pretext.pt")["pretext"]
    main(["bissl", "finetune", "report", *args])
    after = load_checkpoint(out / "digits" / "bissl.pt")
    frozen = [k for k in before if k.startswith("backbone.") and "lora_" not in k]
    assert frozen
    for k in frozen:
        assert torch.equal(before[k], after["pretext"][k]), k
        assert torch.equal(before[k], after["downstream"][k]), k
    moved = [k for k in before if "lora_" in k and not torch.equal(before[k], after["pretext"][k])]
    assert moved
    assert json.loads((out / "digits" / "bissl_ft.json").read_text())["summary"]


def test_vit_configs_load_with_the_bisslight_settings():
    from recipes.common import load_config
    from recipes.vision.config import VisionConfig

    paper = load_config("recipes/configs/vision_vit_paper.yaml", VisionConfig)
    b = paper.bissl
    assert (paper.model.backbone, paper.model.vit_size, paper.pretext.task) == ("vit", "b16", "mae")
    assert (b.alternations, b.lower_steps, b.upper_steps, b.lam, b.lower_lr) == (
        500, 20, 8, 0.001, 0.01)
    assert (paper.model.lora_rank, paper.pretext.decoder_lr, b.lower_batch_size,
            b.upper_batch_size, paper.warmup.epochs) == (64, 1e-4, 256, 64, 20)
    embedded = load_config("recipes/configs/vision_vit_embedded.yaml", VisionConfig)
    assert embedded.bissl.ij == "mfac" and embedded.model.lora_targets == ["q", "v"]
    with pytest.raises(ValueError, match="mae needs model.backbone=vit"):
        load_config("recipes/configs/vision_embedded.yaml", VisionConfig,
                    ["pretext.task=mae"])


def test_masked_batches_replay_exactly_on_a_trainer_resume():
    from torch.utils.data import DataLoader, TensorDataset

    from implicitbilevel.bissl.batch_stack import BatchStack

    images = torch.rand(12, 3, 8, 8)
    loader = DataLoader(TensorDataset(images, images), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    stack = BatchStack(MaskedBatches(loader, 4, seed=5))
    for _ in range(5):  # into the second pass
        stack.next()
    state, rng = stack.state_dict(), torch.random.get_rng_state()  # the trainer saves both
    later = [stack.next() for _ in range(4)]
    torch.manual_seed(123)  # a resumed process: another global state until the stack restores it
    resumed = BatchStack(MaskedBatches(loader, 4, seed=5))
    resumed.load_state_dict(state)
    torch.random.set_rng_state(rng)
    for (x, noise), (y, noise2) in zip(later, [resumed.next() for _ in range(4)]):
        assert torch.equal(x, y) and torch.equal(noise, noise2)
