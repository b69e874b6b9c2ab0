"""Built-in parameter sets for benchmarks, generated from architecture shapes alone (nothing
is downloaded): the tensor shapes a model's ``named_parameters()`` would yield."""

from __future__ import annotations

from collections.abc import Callable

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    """torchvision's ResNet-50: 161 tensors, 25.6M elements (23.5M without the classifier)."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_124m() -> list[Shape]:
    """GPT-2 small (tied embedding counted once): 148 tensors, 124.4M elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def vit_b16() -> list[Shape]:
    """ViT-B/16 at 224 px, 1000 classes: 152 tensors, 86.6M elements."""
    d, layers, mlp = 768, 12, 3072
    shapes: list[Shape] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def decoder_1b() -> list[Shape]:
    """A Llama-style 1B decoder (d=2048, 16 layers, GQA 32/8 heads, SwiGLU 8192, vocab 32000,
    untied head): 147 tensors, 1.10B elements."""
    d, layers, ffn, vocab, kv = 2048, 16, 8192, 32000, 512
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    shapes += [(d,), (vocab, d)]
    return shapes


def many_small() -> list[Shape]:
    """2000 small tensors of 1..4096 elements: launch and host overhead dominate."""
    return [(1 + (i * 7919) % 4096,) for i in range(2000)]


def tiny() -> list[Shape]:
    """7 tensors of awkward sizes, for tests and quick runs (not a measurement): 17.1K elements."""
    return [(17,), (1,), (33, 9), (4097,), (64, 64, 3, 1), (15,), (127, 3)]


PARAM_SETS: dict[str, Callable[[], list[Shape]]] = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "gpt2_124m": gpt2_124m,
    "decoder_1b": decoder_1b,
    "many_small": many_small,
    "tiny": tiny,
}

# The sets ``--set all`` means: every model-shaped set (the tiny test set is left out).
MODEL_SETS: tuple[str, ...] = ("resnet50", "vit_b16", "gpt2_124m", "decoder_1b", "many_small")


def describe(name: str) -> str:
    """One line per set: its name, tensor count, element count and docstring summary."""
    shapes = PARAM_SETS[name]()
    summary = " ".join((PARAM_SETS[name].__doc__ or "").split()).split(":")[0]
    n = numel(shapes)
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
    return f"{name}: {len(shapes)} tensors, {size} elements; {summary}"


def numel(shapes: list[Shape]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
