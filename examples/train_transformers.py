"""Switch EMA in the Hugging Face ``Trainer`` with ``sema.integrations.transformers.SwitchEMACallback``,
on the CPU, in well under a minute.

A tiny BERT (built from a config: nothing is downloaded) learns a synthetic token task. The
callback updates the EMA after every optimizer step, switches it into the model at every epoch
end (one log line per switch, logger ``sema.integrations``), evaluates on the EMA, and writes the
EMA state beside each checkpoint (``checkpoint-N/sema_switch_ema.pt``). Then the later
checkpoints are deleted, as if the run had died after its first epoch; the resumed run lands on
the same weights, bit for bit.

    pip install transformers accelerate
    python examples/train_transformers.py
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from sema.integrations.transformers import SwitchEMACallback

SEQ, VOCAB = 16, 128


class TokenTask(torch.utils.data.Dataset):
    """Label 1 when the first token is in the upper half of the vocabulary."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = (self.input_ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tiny_bert() -> transformers.PreTrainedModel:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def train(output_dir: Path, resume: bool = False) -> tuple[transformers.Trainer, SwitchEMACallback]:
    transformers.set_seed(0)
    callback = SwitchEMACallback(decay=0.95, warmup="linear", warmup_steps=10, validate_on="ema")
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,  # one EMA update per optimizer step
        learning_rate=5e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TokenTask(512, seed=1),
        eval_dataset=TokenTask(128, seed=2),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume or None)
    evaluations = [(round(e["epoch"]), e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    print(f"train done: {callback.ema.num_switches} switches, {callback.ema.step} EMA updates, eval loss {evaluations}")
    return trainer, callback


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sema").setLevel(logging.INFO)
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = Path(tmp)
        full, _ = train(output_dir)
        final = [p.detach().clone() for p in full.model.parameters()]
        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for later in checkpoints[1:]:  # as if the run had died after its first epoch
            shutil.rmtree(later)
        print(f"resuming from {checkpoints[0].name}")
        resumed, _ = train(output_dir, resume=True)  # the latest checkpoint left, with its EMA state
        same = all(torch.equal(a, b) for a, b in zip(final, resumed.model.parameters(), strict=True))
        print(f"resumed run ends on the same weights, bit for bit: {same}")


if __name__ == "__main__":
    main()
