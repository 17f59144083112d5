"""The judge: a small CNN classifier over the synthetic world, the offline fidelity metric.

Labels are ``fastcp.data.synthetic.JUDGE_CLASSES``: the base shapes first, then every embedded
personal concept. Fidelity of concept j = fraction of images generated from j's prompt that the
judge labels j; base-class accuracy = fraction of images generated from "a <colour> <shape>" that
it labels with that shape. It stands in for CLIP image alignment when no CLIP model is at hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

JUDGE_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny" / "judge"


class Judge(nn.Module):
    """CNN: images [B, 3, 32, 32] in [-1, 1] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int, width: int = 48):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Top-1 labels [B] (long)."""
        self.eval()
        out = [self(images[i : i + batch_size].float()).argmax(-1) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def save(self, path: str | Path, classes: list[str]) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "judge.safetensors"))
        (path / "config.json").write_text(json.dumps({"classes": list(classes), "width": self.head.in_features // 2}, indent=2))


def load_judge(path: str | Path = JUDGE_DIR) -> tuple[Judge, list[str]]:
    """Load the judge and its class names. Raises ValueError if the files are missing."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "judge.safetensors").is_file():
        raise ValueError(f"judge: no judge.safetensors in {path} (run python -m fastcp.models.pretrain_tiny)")
    cfg = json.loads((path / "config.json").read_text())
    judge = Judge(len(cfg["classes"]), width=cfg["width"])
    judge.load_state_dict(load_file(str(path / "judge.safetensors")))
    return judge.eval(), cfg["classes"]
