"""Tiny real torch models for the builder's tests and benchmark (imported only with torch)."""

from __future__ import annotations

import numpy as np
import torch


class DigitsCNN(torch.nn.Module):
    """Two convolutions and a linear head over 8×8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(image).flatten(1))
        return logits


def train_digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 6) -> DigitsCNN:
    """Train the CNN on digits (x: N×64 in [0, 1]) with a fixed seed; about two seconds."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only contend on a loaded machine
    model = DigitsCNN()
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8).astype(np.float32))
    labels = torch.from_numpy(y.astype(np.int64))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for start in range(0, len(images), 32):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(images[start : start + 32]), labels[start : start + 32]
            )
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    torch.set_num_threads(threads)
    return model.eval()


class TinyEncoder(torch.nn.Module):
    """A two-layer transformer encoder producing one embedding per sequence."""

    def __init__(self, vocab: int = 100, width: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(
            width, 4, 4 * width, batch_first=True, dropout=0.0, activation="gelu"
        )
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.encoder(self.embed(ids)).mean(1)
        return pooled


def tiny_encoder(seed: int = 0) -> TinyEncoder:
    """An encoder whose weight rows have the uneven scales trained transformers show.

    Trained models develop outlier channels; per-tensor int8 weights lose most
    on them, which is what separates onnxruntime's default from per-channel.
    """
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and not name.startswith("embed"):
                spread = torch.randn(parameter.shape[0], 1, generator=generator) * 1.2
                parameter.mul_(torch.exp(spread))
    return model


def token_batches(count: int = 8, rows: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of token ids with varying sequence lengths."""
    rng = np.random.default_rng(seed)
    return [
        {"ids": rng.integers(0, 100, (rows, int(length))).astype(np.int64)}
        for length in rng.integers(5, 20, count)
    ]


@torch.library.custom_op("edgepacktest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An operator with no ONNX translation in either exporter."""
    return x * 2


@mystery.register_fake
def _mystery_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Unexportable(torch.nn.Module):
    """A model using :func:`mystery`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = mystery(x) + 1
        return result


class Branchy(torch.nn.Module):
    """Data-dependent control flow: torch.export refuses it, TorchScript tracing takes one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.linear(x) * 2 if x.sum() > 0 else self.linear(x) - 1
        return result


class BranchyEncoder(torch.nn.Module):
    """torch.export refuses the branch; TorchScript bakes the sequence length into a Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.layer(x)
        return y * 2 if x.sum() > 0 else y
