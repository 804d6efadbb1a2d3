"""Fine-tune a locally pretrained timm ResNet with revify, keeping what its weights know.

The user's path, end to end, offline on CPU:

1. a local checkpoint: here we make one by pre-training a small ResNet-34 on scikit-learn's
   digits 0-4 (skipped when ``--checkpoint`` already exists);
2. load it with timm as pretrained weights from a file::

       timm.create_model("resnet34", pretrained=True, num_classes=5,
                         pretrained_cfg_overlay=dict(file=path, num_classes=5))

   ``num_classes`` inside the overlay is the number of classes *of the checkpoint*: timm compares
   the model's ``num_classes`` with the config's (1000 for ``resnet34``) and, if they differ,
   silently drops the checkpoint's classifier. For a new task with another head, leave it out
   (or call ``model.reset_classifier(n)`` as below);
3. ``revify.convert(model)``, whose default *faithful* coupling (``alpha=63/64, beta=1/64``)
   ``x_{k+1} = x_k + R_k(x_k) + (x_{k-1} - x_k) / 64`` stays close to the pretrained network
   and is exactly reversible thanks to fixed-point streams;
4. ``revify.audit``: how many bytes a training step keeps for backward, before and after;
   ``revify.check``: how close the converted model is to the original (top-1 agreement on the
   digits 0-4 test images through the pretrained head), and whether its gradients are as
   accurate as ordinary autograd's;
5. fine-tune on digits 5-9 with a new head, as one would fine-tune the unconverted model;
   then the test accuracy.

The 8x8 digits are upscaled to 32 px and repeated to 3 channels; training batches are shifted by
up to 3 px. About two minutes on two CPU cores::

    .venv/bin/python examples/finetune_pretrained.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import revify

_SHIFT = 3  # random shifts of up to 3 px at 32 px


def load_data(size: int = 32, seed: int = 0) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """``{"pretrain", "pretrain_test", "finetune", "finetune_test"}`` -> ``(images, labels)``,
    and the value of a blank pixel.

    Images (N, 3, size, size) standardised with the pre-training set's statistics; digits 0-4
    keep their labels, digits 5-9 become 0-4. Stratified 75/25 splits of each half.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    out = {}
    for name, digits_in in (("pretrain", labels < 5), ("finetune", labels >= 5)):
        idx = torch.nonzero(digits_in).flatten().tolist()
        train, test = train_test_split(idx, test_size=0.25, random_state=seed,
                                       stratify=labels[idx].tolist())
        out[name] = images[train], labels[train] % 5
        out[f"{name}_test"] = images[test], labels[test] % 5
    mean, std = out["pretrain"][0].mean(), out["pretrain"][0].std()
    return {k: ((x - mean) / std, y) for k, (x, y) in out.items()}, float(-mean / std)


def shifted(x: Tensor, gen: torch.Generator, blank: float) -> Tensor:
    """Move every image of ``x`` (B, C, H, W) by a random offset in ``[-3, 3]`` pixels along
    both axes, filling the uncovered pixels with ``blank``."""
    _, _, h, w = x.shape
    padded = F.pad(x, (_SHIFT,) * 4, value=blank)
    offsets = torch.randint(0, 2 * _SHIFT + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets)])


def train(
    model: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float, seed: int,
    blank: float, desc: str,
) -> None:
    """SGD with momentum and a cosine learning rate on random shifted mini-batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(shifted(x[idx], gen, blank)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode (a converted model runs a plain forward under no_grad)."""
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def pretrain(path: Path, arch: str, channels: tuple[int, ...], steps: int, seed: int,
             data: dict[str, tuple[Tensor, Tensor]], blank: float) -> None:
    """Stand-in for someone else's pretrained weights: digits 0-4, saved as a state_dict.

    ``zero_init_last=False``: timm's default zeroes each residual branch at initialisation, and
    after a short training the branches would still be small, unlike a real pretrained model's.
    """
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=5, channels=channels, zero_init_last=False)
    train(model, *data["pretrain"], steps=steps, batch=64, lr=0.05, seed=seed, blank=blank,
          desc="pre-train")
    print(f"pretrained on digits 0-4: test accuracy "
          f"{accuracy(model, *data['pretrain_test']):.2%}; saved to {path}")
    torch.save(model.state_dict(), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet34", help="a timm ResNet")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--checkpoint", help="local pretrained state_dict; created by "
                        "pre-training on digits 0-4 if missing (default: a temporary file)")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; on a 2-core machine shared with other jobs "
                        "2 threads made each step 4x slower than 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = tuple(args.width * 2**i for i in range(4))
    data, blank = load_data()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint or Path(tmp) / f"{args.arch}_digits04.pth")
        if not path.exists():
            pretrain(path, args.arch, channels, args.pretrain_steps, args.seed, data, blank)

        # 2. The checkpoint, loaded as pretrained weights from a local file (no download).
        model = timm.create_model(
            args.arch, pretrained=True, num_classes=5, channels=channels,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
        )
    x_old, y_old = data["pretrain_test"]
    print(f"loaded {path.name}: digits 0-4 test accuracy {accuracy(model, x_old, y_old):.2%}")

    # 3. The default (faithful) conversion: close to the pretrained function, exactly reversible.
    revify.convert(model)

    # 4. What it saves, and what it changes.
    revify.audit(model, (3, 32, 32), batch_size=args.batch).print_rich()
    # Agreement with the original through the pretrained head on held-out images, then the
    # gradient check of one training step (train mode, as it will be trained).
    print(revify.check(model.train(), x_old))
    print(f"converted model: digits 0-4 test accuracy {accuracy(model, x_old, y_old):.2%}")

    # 5. Fine-tune on digits 5-9 with a new head, as the unconverted model would be.
    torch.manual_seed(args.seed)
    model.reset_classifier(5)
    train(model, *data["finetune"], steps=args.steps, batch=args.batch, lr=args.lr,
          seed=args.seed, blank=blank, desc="fine-tune")
    print(f"digits 5-9 test accuracy after fine-tuning: "
          f"{accuracy(model, *data['finetune_test']):.2%}")


if __name__ == "__main__":
    main()
