"""Docs that run: every ```python block of README.md and docs/*.md runs here on the CPU.

Each block runs in a fresh namespace, in a temporary directory, under a time limit. The line
just before a block's fence (blank lines aside) may hold one marker:

    <!-- doc-test: prelude=tiny -->              run PRELUDES["tiny"] first (stand-ins below)
    <!-- doc-test: syntax-only (REASON) -->      compile only; the reason is required (CUDA,
                                                 torchrun, a peer library not installed, ...)

A block without a marker runs as it is. A block that fails or warns (a doc example that warns
is a bad example; a block that shows a warning catches it), an unknown marker, or a syntax-only
marker without a reason fails the test. The ``tiny`` prelude stands in for the reader's own
things: ``model`` (a small MLP with a BatchNorm), ``build_model()`` (another one), ``loader``
(40 small batches), ``loss_fn``, ``epochs``, ``evaluate(model)`` (accuracy on one batch, no
grad) and ``train_one_epoch(model, optimizer)``.

Also checked: relative Markdown links and backticked repository paths point at files that exist,
so a moved result file or a renamed script breaks CI too.
"""

from __future__ import annotations

import contextlib
import re
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIME_LIMIT_S = 20
GENERATED = ("bench/results/latest-",)  # written by make profile / make peers, not committed

PRELUDES = {
    "tiny": """
import torch
from torch import nn

torch.manual_seed(0)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


model = build_model()
# 40 steps per epoch: long enough for decay=0.99 (SwitchHorizonWarning below 0.3 / (1 - decay) steps).
loader = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(40)]
loss_fn = nn.functional.cross_entropy
epochs = 2


def evaluate(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        x, y = loader[0]
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return accuracy


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
""",
}

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
SYNTAX_ONLY = re.compile(r"^syntax-only\s*\((.+)\)$")
PRELUDE = re.compile(r"^prelude=(\w+)$")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
REPO_PATH = re.compile(r"`((?:bench|tests|sema|examples|docs|csrc|kernels|\.ci)/[\w./-]+)`")


@dataclass
class Block:
    file: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker on the line before it, if any."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: code fence never closed")
        before = i - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.match(lines[before].strip()) if before >= 0 else None
        blocks.append(Block(path, i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                            marker.group(1) if marker else None))  # fmt: skip
        i = end + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in blocks_of(path) if b.language == "python"]


def parse_marker(block: Block) -> tuple[str, str]:
    """``("run", prelude name or "")`` or ``("syntax", reason)``; a bad marker fails with its place."""
    if block.marker is None:
        return "run", ""
    syntax = SYNTAX_ONLY.match(block.marker)
    if syntax and syntax.group(1).strip():
        return "syntax", syntax.group(1).strip()
    prelude = PRELUDE.match(block.marker)
    if prelude and prelude.group(1) in PRELUDES:
        return "run", prelude.group(1)
    raise AssertionError(
        f"{block.id}: unknown doc-test marker {block.marker!r}; use 'prelude=NAME' with NAME in "
        f"{sorted(PRELUDES)} or 'syntax-only (why it cannot run on the CPU)'"
    )


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_block(block: Block, code: str | None = None) -> None:
    """Compile ``block`` (or ``code`` in its place); run it unless it is marked syntax-only."""
    kind, detail = parse_marker(block)
    # Padded so that tracebacks name the Markdown file and its line numbers.
    compiled = compile("\n" * block.line + (code or block.code), str(block.file), "exec")
    if kind == "syntax":
        return
    namespace: dict[str, object] = {"__name__": "__doc_test__"}
    threads = torch.get_num_threads()
    # The blocks' tensors are tiny; on a busy machine every 2-thread region would wait for its
    # second thread (tens of seconds per block instead of a fraction of one).
    torch.set_num_threads(1)
    try:
        with time_limit(TIME_LIMIT_S, block.id), warnings.catch_warnings():
            warnings.simplefilter("error")
            if detail:
                exec(compile(PRELUDES[detail], f"<prelude {detail}>", "exec"), namespace)
            exec(compiled, namespace)
    finally:
        torch.set_num_threads(threads)


BLOCKS = python_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_block(block)


def test_every_doc_page_is_read() -> None:
    """docs/ holds Markdown only (a page in another format would escape this test), the README
    has a python block to run, and most blocks run rather than only compile."""
    others = [p.name for p in (ROOT / "docs").iterdir() if p.suffix != ".md"]
    assert not others, f"docs/ holds files this test does not read: {others}"
    assert len(DOC_FILES) > 5, f"only {len(DOC_FILES)} doc files found"
    kinds = [parse_marker(b)[0] for b in BLOCKS]
    assert any(b.file.name == "README.md" and b.file.parent == ROOT for b in BLOCKS), "README has no python block"
    assert kinds.count("run") > kinds.count("syntax"), f"{kinds.count('syntax')} of {len(kinds)} blocks are syntax-only"


def test_a_renamed_api_name_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the README's quickstart with ``SwitchEMA`` misspelt must fail, and so
    must a syntax-only block with a syntax error."""
    monkeypatch.chdir(tmp_path)
    quickstart = next(b for b in BLOCKS if "SwitchEMA(" in b.code and parse_marker(b)[0] == "run")
    with pytest.raises(AttributeError, match="SwitchEMAX"):
        run_block(quickstart, quickstart.code.replace("SwitchEMA(", "SwitchEMAX("))
    syntax_only = next(b for b in BLOCKS if parse_marker(b)[0] == "syntax")
    with pytest.raises(SyntaxError):
        run_block(syntax_only, syntax_only.code + "\ndef broken(:\n")


def test_markers_are_checked() -> None:
    def block(marker: str) -> Block:
        return Block(ROOT / "README.md", 1, "python", "x = 1\n", marker)

    assert parse_marker(block("syntax-only (CUDA)")) == ("syntax", "CUDA")
    assert parse_marker(block("prelude=tiny")) == ("run", "tiny")
    for bad in ("syntax-only", "syntax-only ()", "prelude=nonesuch", "skip"):
        with pytest.raises(AssertionError, match="unknown doc-test marker"):
            parse_marker(block(bad))


def test_time_limit_stops_a_block() -> None:
    slow = Block(ROOT / "README.md", 1, "python", "while True:\n    pass\n", None)
    with pytest.raises(TimeoutError, match="longer than 1 s"), time_limit(1, slow.id):
        exec(compile(slow.code, slow.id, "exec"), {})


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_links_and_paths_exist(path: Path) -> None:
    text = path.read_text()
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (path.parent / target).exists():
            missing.append(f"link {target}")
    for target in REPO_PATH.findall(text):
        if not target.startswith(GENERATED) and not (ROOT / target.rstrip(".")).exists():
            missing.append(f"path {target}")
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {', '.join(missing)}"
